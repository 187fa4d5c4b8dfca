"""The collapse passes of a probe: collapse metrics of every layer at every stage.

Forward hooks feed each layer's input, its projection (WᵀW)^{1/2} h and its output (or the
output of the activation after it) to streaming accumulators (``analysis.CollapseAccumulator``);
a second pass follows when a metric needs the class means first. Both passes must see the
samples of the first pass over the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import xarray as xr
from torch import nn

from analysis import CollapseAccumulator
from analysis._common import user_stacklevel
from deeprfm.probes.batches import PassRecord, different_samples_error
from deeprfm.probes.hooks import (
    activation_module,
    forward_hooks,
    layer_input,
    missed_activation_error,
    shared_layer_error,
)
from deeprfm.probes.layers import ProbedLayer, module_matrix
from deeprfm.probes.stages import project, projection_matrix

__all__ = ["collapse_passes", "projection_roots"]

#: Float64 vectors of length d per class that a layer's collapse statistics keep.
COLLAPSE_VECTORS = 4


def collapse_passes(
    layers: Sequence[ProbedLayer],
    stages: Sequence[str],
    forms: dict[str, str],
    budget: int,
    device: torch.device,
    reference: PassRecord,
    batches: Callable[[str], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    forward: Callable[[torch.Tensor, Iterable[str]], torch.Tensor],
) -> dict[tuple[str, str], xr.Dataset | None]:
    """Collapse metrics of each layer's stages: the first pass, then a second if needed.

    Parameters
    ----------
    layers, stages, forms
        The probed layers, the stages to measure (:data:`STAGES`) and each layer's matrix form.
    budget : int
        Bytes; a layer and stage whose statistics exceed it gets NaN metrics, with a warning.
    device : torch.device
        Where the statistics are kept.
    reference : PassRecord
        The first pass's record: every collapse pass must see the same samples.
    batches, forward
        The driver's batches and model forward, as for
        :meth:`~deeprfm.probes.gradients.GradientPass.run`.

    Returns
    -------
    dict of (layer name, stage) to xarray.Dataset or None (skipped)
    """
    labels = reference.all_labels()
    classes = torch.unique(labels).to(device)
    if len(classes) < 2:
        raise ValueError(
            f"data: the collapse metrics need at least 2 classes, got labels {classes.tolist()}"
        )
    roots = projection_roots(layers, forms, device) if "projected" in stages else {}
    accumulators: dict[tuple[str, str], CollapseAccumulator | None] = {}
    called: set[str] = set()
    pending: dict[str, torch.Tensor] = {}  # layer outputs awaiting their activation
    state: dict[str, Any] = {}

    def accumulate(layer: ProbedLayer, stage: str, features: torch.Tensor | None) -> None:
        index, key = state["index"], (layer.name, stage)
        if features is not None and (features.ndim == 0 or features.shape[0] != len(index)):
            raise ValueError(
                f"layers: the {stage} of {layer.name!r} has shape {tuple(features.shape)}, "
                f"not batch-first with batch {len(index)}; its collapse metrics cannot be "
                "computed (exclude it with layers= or use collapse=False)"
            )
        if key not in accumulators:
            fits = (
                features is not None
                and COLLAPSE_VECTORS * 8 * len(classes) * features[0].numel() <= budget
            )
            accumulators[key] = CollapseAccumulator(len(classes), device=device) if fits else None
        acc = accumulators[key]
        if acc is not None:
            (acc.update_second_pass if state["second"] else acc.update)(features, index)

    def make_hook(layer: ProbedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
            if layer.name in called:
                raise shared_layer_error(layer.name)
            called.add(layer.name)
            features = layer_input(args, kwargs)
            if "input" in stages:
                accumulate(layer, "input", features)
            if "projected" in stages:
                root = roots.get(layer.name)
                accumulate(
                    layer,
                    "projected",
                    None if root is None else project(module, features, root),
                )
            if "output" in stages:
                if layer.activation is None:
                    accumulate(layer, "output", output)
                else:
                    pending[layer.name] = output

        return hook

    def make_activation_hook(layer: ProbedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
            if layer.name in pending and pending[layer.name] is layer_input(args, kwargs):
                del pending[layer.name]
                accumulate(layer, "output", output)

        return hook

    activations = [layer for layer in layers if layer.activation is not None]
    for second in (False, True):
        if second and not any(a is not None and a.needs_second_pass for a in accumulators.values()):
            break
        state["second"] = second
        record = PassRecord()
        with (
            torch.no_grad(),
            forward_hooks(layers, make_hook),
            forward_hooks(activations, make_activation_hook, module=activation_module),
        ):
            for x, y in batches(f"collapse pass {1 + second}"):
                index = torch.searchsorted(classes, y).clamp_max(len(classes) - 1)
                if not torch.equal(classes[index], y):
                    raise different_samples_error()
                state["index"] = index
                called.clear()
                forward(x, called)
                if pending:
                    raise missed_activation_error(layers, pending)
                record.add(x, y)
        if not record.same_samples(reference):
            raise different_samples_error()
    skipped = [f"{name} ({stage})" for (name, stage), acc in accumulators.items() if acc is None]
    if skipped:
        warnings.warn(
            f"layers {skipped}: the collapse statistics of {len(classes)} classes x their "
            f"features exceed the memory budget of {budget / 1024**3:.2f} GiB (for the "
            "projected stage: the d x d matrix (W^T W)^1/2 does); their collapse metrics "
            "are NaN",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return {key: None if acc is None else acc.result() for key, acc in accumulators.items()}


def projection_roots(
    layers: Sequence[ProbedLayer], forms: dict[str, str], device: torch.device
) -> dict[str, torch.Tensor]:
    """(WᵀW)^{1/2} (d, d) of every layer whose d × d matrices fit the budget (full form)."""
    return {
        layer.name: projection_matrix(module_matrix(layer.module).to(device))
        for layer in layers
        if forms[layer.name] == "full"
    }
