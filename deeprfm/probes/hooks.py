"""Forward hooks and the evaluation mode of a measured model, restored on exit.

Hooks act only on the forward passes of the thread that registered them, and the evaluation
mode of a model is shared by the measurements under way and restored by the last, so probes can
measure one model from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deeprfm.probes.layers import ProbedLayer

__all__ = [
    "activation_module",
    "evaluation_mode",
    "forward_hooks",
    "layer_input",
    "missed_activation_error",
    "shared_layer_error",
]


def activation_module(layer: ProbedLayer) -> nn.Module:
    return layer.activation[1]


@contextmanager
def forward_hooks(
    layers: Sequence[ProbedLayer],
    make_hook: Callable[[ProbedLayer], Callable[..., Any]],
    module: Callable[[ProbedLayer], nn.Module] = lambda layer: layer.module,
) -> Iterator[None]:
    """Forward hooks (with kwargs) on every layer's module (or the one ``module`` picks),
    removed on exit, also after an exception. They act only on forward passes of the thread
    that registered them, so probes measuring one model from several threads do not mix."""
    owner = threading.get_ident()

    def own_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
        def filtered(*args: Any) -> Any:
            return hook(*args) if threading.get_ident() == owner else None

        return filtered

    handles = [
        module(layer).register_forward_hook(own_thread_only(make_hook(layer)), with_kwargs=True)
        for layer in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


#: Models inside a measurement: id -> [measurements under way, saved modes, saved flags].
_MEASURED: dict[int, list[Any]] = {}
_MEASURED_LOCK = threading.Lock()


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside; every module's mode and flag restored on exit.

    Measurements of one model from several threads share the state saved by the first and
    the last to finish restores it.
    """
    with _MEASURED_LOCK:
        entry = _MEASURED.get(id(model))
        if entry is None:
            modes = [(module, module.training) for module in model.modules()]
            flags = [(p, p.requires_grad) for p in model.parameters()]
            entry = _MEASURED[id(model)] = [0, modes, flags]
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
        entry[0] += 1
    try:
        yield
    finally:
        with _MEASURED_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _MEASURED[id(model)]
                for module, training in entry[1]:
                    module.training = training
                for p, requires_grad in entry[2]:
                    p.requires_grad_(requires_grad)


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def missed_activation_error(
    layers: Sequence[ProbedLayer], pending: Mapping[str, Any]
) -> ValueError:
    missed = {layer.name: layer.activation[0] for layer in layers if layer.name in pending}
    return ValueError(
        f"output_stage: the activations {missed} did not receive their layers' outputs in the "
        "forward pass (the model does not run them right after the layer); use "
        "output_stage='layer'"
    )


def shared_layer_error(name: str) -> ValueError:
    return ValueError(
        f"layers: {name!r} ran more than once in one forward pass (a shared module); "
        "NeuralProbe needs each selected layer to run once per forward: exclude it with layers="
    )
