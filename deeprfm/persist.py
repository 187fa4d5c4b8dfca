"""Saving fitted models as tensors plus a JSON configuration, loaded without pickled code.

A file holds ``{"format": ..., "config": <JSON string>, "manifest": <JSON string>,
"tensors": {name: tensor}}`` written by ``torch.save`` and read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers:
loading a tampered file cannot execute code. The manifest records every tensor's shape, dtype
and SHA-256 digest; :func:`load_state` verifies them, and :func:`check_tensors` the shapes a
model's configuration implies, so a damaged or edited file is refused with a
:class:`ModelFileError` instead of predicting garbage.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from analysis._common import user_stacklevel
from deeprfm._memory import resolve_dtype

__all__ = [
    "ModelFileError",
    "check_tensors",
    "jsonable_params",
    "load_state",
    "model_file_errors",
    "params_json",
    "restore_params",
    "save_state",
]

_FORMAT = "deeprfm-2"
#: Earlier formats that load (without digests to verify, with a warning).
_OLD_FORMATS = ("deeprfm-1",)


class ModelFileError(ValueError):
    """A model file that is not a valid deeprfm model: its message names the file and why."""


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _describe(tensor: torch.Tensor) -> dict:
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "sha256": _digest(tensor),
    }


def save_state(path: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a configuration (JSON-serialisable dict) and named tensors to ``path``."""
    tensors = {name: t.detach().cpu() for name, t in tensors.items()}
    state = {
        "format": _FORMAT,
        "config": json.dumps(config),
        "manifest": json.dumps({name: _describe(t) for name, t in tensors.items()}),
        "tensors": tensors,
    }
    torch.save(state, Path(path))


def load_state(path: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify what :func:`save_state` wrote; ``kind`` must match ``config["kind"]``.

    Returns
    -------
    config : dict
    tensors : dict of str to torch.Tensor (on the CPU)

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ModelFileError
        A directory, an empty, truncated or damaged file, a pickle that holds anything but
        tensors and plain containers, another kind of model, a tensor whose shape, dtype or
        SHA-256 digest differs from the manifest, or a missing or extra tensor.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a model file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or refused files
        raise ModelFileError(
            f"{path}: not a readable deeprfm model file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'empty or truncated'})"
        ) from err
    if not isinstance(state, dict) or state.get("format") not in (_FORMAT, *_OLD_FORMATS):
        raise ModelFileError(f"{path}: not a deeprfm model file (no known format tag)")
    with model_file_errors(path):
        config = json.loads(state["config"])
        tensors = state["tensors"]
        if not isinstance(config, dict) or not isinstance(tensors, dict):
            raise ModelFileError(f"{path}: the configuration or the tensors are malformed")
        if config.get("kind") != kind:
            raise ModelFileError(f"{path}: holds a {config.get('kind')}, not a {kind}")
        if state["format"] == _FORMAT:
            _verify_manifest(path, json.loads(state["manifest"]), tensors)
        else:
            warnings.warn(
                f"{path}: written in the older format {state['format']!r} without digests; "
                "its tensors cannot be verified (save it again to add them)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    return config, tensors


def _verify_manifest(path: Path, manifest: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(manifest) - set(tensors)), sorted(set(tensors) - set(manifest))
    if missing or extra:
        raise ModelFileError(f"{path}: tensors missing {missing} or not in the manifest {extra}")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{path}: {name!r} is not a tensor")
        if _describe(tensor) != manifest[name]:
            raise ModelFileError(
                f"{path}: the tensor {name!r} does not match its recorded shape, dtype and "
                "SHA-256 digest: the file is damaged or was edited"
            )


@contextmanager
def model_file_errors(path: str | Path) -> Iterator[None]:
    """Turn the errors of reading a malformed configuration into :class:`ModelFileError`."""
    try:
        yield
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        what = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
        raise ModelFileError(f"{path}: invalid model file: {what}") from err


def check_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[str | int, ...]],
    sizes: dict[str, int] | None = None,
) -> dict[str, int]:
    """Check the tensors a model needs: present, floating, finite, of consistent shapes.

    Parameters
    ----------
    path : str or Path
        The file, for the messages.
    tensors : mapping of str to torch.Tensor
    shapes : mapping of str to tuple of str or int
        Each required tensor's shape; a str names a size that must be the same wherever it
        appears (``{"X_fit": ("n", "d"), "M": ("d", "d")}``).
    sizes : dict of str to int, optional
        Sizes known beforehand (e.g. ``{"c": len(classes)}``).

    Returns
    -------
    dict of str to int
        Every named size.

    Raises
    ------
    ModelFileError
        A tensor is missing, not floating point, not finite, or of a shape that contradicts
        another's or a known size.
    """
    sizes = dict(sizes or {})
    for name, dims in shapes.items():
        tensor = tensors.get(name)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ModelFileError(f"{path}: the tensor {name!r} is missing or not floating point")
        if tensor.ndim != len(dims):
            raise ModelFileError(f"{path}: {name!r} has {tensor.ndim} dims, expected {len(dims)}")
        for dim, size in zip(dims, tensor.shape, strict=True):
            expected = sizes.setdefault(dim, size) if isinstance(dim, str) else dim
            if size != expected:
                raise ModelFileError(
                    f"{path}: {name!r} has shape {tuple(tensor.shape)}, but its dim {dim!r} "
                    f"must be {expected} to match the rest of the model"
                )
        if not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{path}: {name!r} holds NaN or infinite values")
    return sizes


def jsonable_params(estimator) -> dict:
    """An estimator's constructor parameters as JSON values, to rebuild it with ``cls(**p)``.

    The dtype is stored by name and the device as a string; a nested estimator (a parameter
    that has ``get_params``, such as ``DeepRFM``'s ``layer``) as ``{"estimator": class name,
    "params": its parameters}``; a :class:`~deeprfm.Kernel` instance cannot be stored (give the
    kernel by name to save a model).
    """
    params = estimator.get_params(deep=False)
    if not isinstance(params.get("kernel", ""), str):
        raise TypeError("save needs the kernel given by name, not as a Kernel instance")
    for name, value in params.items():
        if hasattr(value, "get_params"):
            params[name] = {"estimator": type(value).__name__, "params": jsonable_params(value)}
    if "dtype" in params:
        params["dtype"] = str(resolve_dtype(params["dtype"])).removeprefix("torch.")
    if "device" in params:
        params["device"] = None if params["device"] is None else str(params["device"])
    return params


def params_json(estimator) -> str:
    """An estimator's parameters as one JSON string (non-JSON values by their ``str``)."""
    return json.dumps(estimator.get_params(), default=str)


def restore_params(params: dict, device, estimators: Mapping[str, type] | None = None) -> dict:
    """Undo :func:`jsonable_params`: the dtype back to a torch dtype, nested estimators rebuilt.

    Parameters
    ----------
    params : dict
        What :func:`jsonable_params` wrote.
    device : str, torch.device or None
        Overrides the saved device unless None (nested estimators keep theirs).
    estimators : mapping of str to type, optional
        The classes a nested estimator may name; any other name is refused (no code is looked
        up by a name read from a file).
    """
    restored = dict(params)
    for name, value in params.items():
        if isinstance(value, dict) and set(value) == {"estimator", "params"}:
            known = estimators or {}
            if value["estimator"] not in known:
                raise ValueError(
                    f"{name}: unknown estimator {value['estimator']!r}; known: {sorted(known)}"
                )
            nested = restore_params(value["params"], None, estimators)
            restored[name] = known[value["estimator"]](**nested)
    if "dtype" in params:
        restored["dtype"] = resolve_dtype(params["dtype"])
    if device is not None:
        restored["device"] = device
    return restored
