"""Collapse stages of a probed layer: its input h, the projection (WᵀW)^{1/2} h, its output.

Beaglehole, Súkeník, Mondelli & Belkin (NeurIPS 2024, arXiv 2402.13728) split a layer
h → σ(W h + b) into the right singular structure of W, which acts as (WᵀW)^{1/2} h = V S Vᵀ h,
and the rest. NC1 is invariant to isometries, so the NC1 of (WᵀW)^{1/2} h equals that of
S Vᵀ h and that of W h: comparing ``input`` with ``projected`` isolates what the weights remove,
comparing ``projected`` with the output after the activation what the nonlinearity removes.

For a Conv2d layer the projection acts on every patch (the C_in·kh·kw vectors that
``torch.nn.functional.unfold`` extracts), and the projected features of a sample are all its
projected patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deeprfm.agop import psd_power

__all__ = ["STAGES", "check_stages", "following_activation", "project"]

#: Collapse stages of a layer, in the order of the results.
STAGES = ("input", "projected", "output")
#: Where the ``output`` stage is taken: the layer's own output, or after its activation.
OUTPUT_STAGES = ("layer", "activation")


def check_stages(stages: str | Sequence[str]) -> tuple[str, ...]:
    """The requested stages in the order of :data:`STAGES`; ValueError/TypeError otherwise."""
    names = [stages] if isinstance(stages, str) else stages
    if not isinstance(names, Sequence) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"stages: expected a sequence of names from {STAGES}, got {stages!r}")
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"stages: expected a non-empty subset of {STAGES}, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"stages: {list(names)} names a stage more than once")
    return tuple(name for name in STAGES if name in names)


def _is_activation(module: nn.Module) -> bool:
    """A parameter-free module of ``torch.nn.modules.activation`` (ReLU, GELU, Tanh, …)."""
    return (
        type(module).__module__ == "torch.nn.modules.activation"
        and next(module.parameters(), None) is None
    )


def following_activation(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    """The activation module that follows the layer at ``path`` in its parent container.

    Returns ``(path, module)`` of the next child of the layer's parent (an ``nn.Sequential``
    or any module, in registration order) when it is an activation, else None (the layer
    is the model itself, the last child, or followed by e.g. a normalisation).
    """
    if not path:
        return None
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    children = list(parent.named_children())
    position = [child for child, _ in children].index(name)
    if position + 1 == len(children):
        return None
    child, module = children[position + 1]
    if not _is_activation(module):
        return None
    return (f"{parent_path}.{child}" if parent_path else child), module


def projection_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(WᵀW)^{1/2} (d, d) of a (k, d) weight matrix, computed in float64, in W's dtype."""
    w = weight.to(torch.float64)
    return psd_power(w.T @ w, 0.5).to(weight.dtype)


def project(module: nn.Module, features: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """The ``projected`` stage of a layer's input, one row per sample.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer.
    features : torch.Tensor
        Its input: (b, ..., d) for a Linear, (b, C_in, H, W) for a Conv2d.
    root : torch.Tensor, shape (d, d)
        (WᵀW)^{1/2} of the layer's weight matrix (see :func:`projection_matrix`).

    Returns
    -------
    torch.Tensor, shape (b, positions · d)
        Every position's input vector (a Linear's trailing dim; a Conv2d's patches) times
        (WᵀW)^{1/2}.
    """
    if isinstance(module, nn.Conv2d):
        features = _patches(module, features).transpose(1, 2)  # (b, L, C_in·kh·kw)
    projected = features @ root.to(features.dtype)
    return projected.reshape(projected.shape[0], -1)


def _patches(module: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """The (b, C_in·kh·kw, L) patches a Conv2d multiplies by its weight matrix."""
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        features = F.pad(features, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return F.unfold(
        features,
        module.kernel_size,
        dilation=module.dilation,
        padding=padding,
        stride=module.stride,
    )
