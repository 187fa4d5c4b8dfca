"""Which layers a probe measures, and the weight matrix W (k × d) of each.

A Linear weight is its own matrix; a Conv2d weight is reshaped to (C_out, C_in·kh·kw), the
matrix acting on one patch, block-diagonal over groups. A layer whose d × d float64 matrices do
not fit the memory budget is measured in *diagonal form* (:func:`matrix_form`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "LAYER_TYPES",
    "ProbedLayer",
    "initial_matrix",
    "matrix_form",
    "model_device_dtype",
    "module_matrix",
    "select_layers",
    "weight_matrix",
]

#: Name of a model that is itself the only selected layer.
ROOT_NAME = "model"
LAYER_TYPES = (nn.Linear, nn.Conv2d)
#: d × d float64 matrices alive per layer while its NFM, AGOP and NFA correlations are formed.
MATRIX_COPIES = 6

LayerSelection = Literal["auto"] | str | Sequence[str] | Callable[[str, nn.Module], bool]


def weight_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A Linear or Conv2d weight as the matrix acting on one input position.

    Parameters
    ----------
    weight : torch.Tensor, shape (k, d_in) or (C_out, C_in / groups, kh, kw)
    groups : int
        Groups of the convolution.

    Returns
    -------
    torch.Tensor, shape (k, d)
        A Linear weight as is; a Conv2d weight as (C_out, C_in·kh·kw), columns in the order of
        ``torch.nn.functional.unfold`` (channel, row, column). With ``groups > 1`` the
        block-diagonal matrix whose j-th block maps the j-th group's input channels to its
        output channels (zeros elsewhere). A view of ``weight`` when ``groups == 1``.
    """
    weight = weight.detach()
    if groups == 1:
        return weight.reshape(weight.shape[0], -1)
    return torch.block_diag(*weight.reshape(groups, weight.shape[0] // groups, -1))


def module_matrix(module: nn.Module) -> torch.Tensor:
    return weight_matrix(module.weight, getattr(module, "groups", 1))


@dataclass
class ProbedLayer:
    """A selected layer: display name, module path, module, matrix sizes and W₀."""

    name: str
    path: str
    module: nn.Module
    init: torch.Tensor | None = None  # (k, d) W₀ of the centred NFM
    activation: tuple[str, nn.Module] | None = None  # where the ``output`` stage is taken

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> tuple[int, int]:
        """(k, d): outputs per position and input features per position (patch size)."""
        weight = self.module.weight
        return weight.shape[0], weight[0].numel() * getattr(self.module, "groups", 1)

    def matrix(self) -> torch.Tensor:
        """(k, d) weight matrix, minus W₀ when the NFM is centred."""
        w = module_matrix(self.module)
        return w if self.init is None else w - self.init.to(w)


def candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Display name -> (module path, module) of every Linear / Conv2d, in definition order."""
    return {
        (path or ROOT_NAME): (path, module)
        for path, module in model.named_modules()
        if isinstance(module, LAYER_TYPES)
    }


def select_layers(model: nn.Module, layers: LayerSelection) -> dict[str, tuple[str, nn.Module]]:
    available = candidates(model)
    if not available:
        raise ValueError(
            f"model: {type(model).__name__} has no nn.Linear or nn.Conv2d layer to probe"
        )
    if isinstance(layers, str) and layers == "auto":
        return available
    if callable(layers):
        chosen = {name: entry for name, entry in available.items() if layers(name, entry[1])}
        if not chosen:
            raise ValueError(
                f"layers: the predicate selected no layer; available: {list(available)}"
            )
        return chosen
    names = [layers] if isinstance(layers, str) else layers
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            "layers: expected 'auto', a layer name, a sequence of names or a predicate "
            f"(name, module) -> bool, got {layers!r}"
        )
    if not names:
        raise ValueError(f"layers: expected at least one name; available: {list(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        modules = dict(model.named_modules())
        kinds = {n: type(modules[n]).__name__ for n in unknown if n in modules}
        detail = f" (not Linear/Conv2d: {kinds})" if kinds else ""
        raise ValueError(
            f"layers: unknown layer(s) {unknown}{detail}; available: {list(available)}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"layers: {duplicates} listed more than once")
    return {n: available[n] for n in names}


def initial_matrix(init_weights: Any, path: str, module: nn.Module) -> torch.Tensor:
    """W₀ (k, d) of one layer from a module or a state dict, copied (training cannot alias it)."""
    if isinstance(init_weights, nn.Module):
        twin = dict(init_weights.named_modules()).get(path)
        if not isinstance(twin, LAYER_TYPES):
            raise ValueError(
                f"init_weights: the module has no Linear/Conv2d at {path or '(root)'!r}"
            )
        weight = twin.weight
    elif isinstance(init_weights, Mapping):
        key = f"{path}.weight" if path else "weight"
        if key not in init_weights:
            raise ValueError(f"init_weights: missing key {key!r}")
        weight = torch.as_tensor(init_weights[key])
    else:
        raise TypeError(
            "init_weights: expected a module or a state dict of the model at initialisation, "
            f"got {type(init_weights).__name__}"
        )
    if weight.shape != module.weight.shape:
        raise ValueError(
            f"init_weights: the weight of {path or '(root)'!r} has shape "
            f"{tuple(weight.shape)}, the model's {tuple(module.weight.shape)}"
        )
    return weight_matrix(weight, getattr(module, "groups", 1)).clone()


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter (CPU, float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def matrix_form(layer: ProbedLayer, budget: int) -> str:
    """``"full"`` if the layer's d × d float64 matrices fit ``budget`` bytes, else
    ``"diagonal"``."""
    return "full" if MATRIX_COPIES * 8 * layer.shape[1] ** 2 <= budget else "diagonal"
