"""Saving fitted models as tensors plus a JSON configuration, loaded without pickled code.

A file holds ``{"format": ..., "config": <JSON string>, "tensors": {name: tensor}}`` written by
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses anything
but tensors and plain containers: loading a tampered file cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deeprfm._memory import resolve_dtype

__all__ = ["jsonable_params", "load_state", "params_json", "restore_params", "save_state"]

_FORMAT = "deeprfm-1"


def save_state(path: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a configuration (JSON-serialisable dict) and named tensors to ``path``."""
    state = {
        "format": _FORMAT,
        "config": json.dumps(config),
        "tensors": {name: t.detach().cpu() for name, t in tensors.items()},
    }
    torch.save(state, Path(path))


def load_state(path: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read what :func:`save_state` wrote; ``kind`` must match ``config["kind"]``.

    Returns
    -------
    config : dict
    tensors : dict of str to torch.Tensor (on the CPU)
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a deeprfm model file")
    config = json.loads(state["config"])
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')}, not a {kind}")
    return config, state["tensors"]


def jsonable_params(estimator) -> dict:
    """An estimator's constructor parameters as JSON values, to rebuild it with ``cls(**p)``.

    The dtype is stored by name and the device as a string; a :class:`~deeprfm.Kernel`
    instance cannot be stored (give the kernel by name to save a model).
    """
    params = estimator.get_params()
    if not isinstance(params["kernel"], str):
        raise TypeError("save needs the kernel given by name, not as a Kernel instance")
    params["dtype"] = str(resolve_dtype(params["dtype"])).removeprefix("torch.")
    params["device"] = None if params["device"] is None else str(params["device"])
    return params


def params_json(estimator) -> str:
    """An estimator's parameters as one JSON string (non-JSON values by their ``str``)."""
    return json.dumps(estimator.get_params(), default=str)


def restore_params(params: dict, device) -> dict:
    """Undo :func:`jsonable_params`: the dtype back to a torch dtype; ``device`` overrides
    the saved device unless it is None."""
    restored = params | {"dtype": resolve_dtype(params["dtype"])}
    if device is not None:
        restored["device"] = device
    return restored
