"""The gradient pass of a probe: each layer's AGOP from gradients at the layer outputs.

For a layer with weight matrix W acting on its input h, the output is W h, so the gradient of
a model output f_c with respect to the input is Wᵀ g_c, g_c the gradient at the output:
AGOP = (1/n) Σ_x Σ_c Σ_p Wᵀ g g ᵀ W = Wᵀ G W (docs/design.md, *The probe's AGOP*). A forward hook
returns ``out + δ`` with a zero leaf δ whose gradient is ∂f/∂out; all outputs go through one
batched backward pass per chunk of cotangents (``is_grads_batched``): one unit cotangent per
output (exact), or Gaussian random projections of the outputs (unbiased, for 1 000-class heads).
A chunk that runs out of GPU memory is halved; a model whose backward pass cannot be batched
falls back to one pass per cotangent, with a warning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from analysis._common import user_stacklevel
from deeprfm._memory import rows_per_block
from deeprfm.agop import OutputProjections
from deeprfm.probes.batches import PassRecord
from deeprfm.probes.hooks import forward_hooks, shared_layer_error
from deeprfm.probes.layers import ProbedLayer, module_matrix

__all__ = ["GradientPass", "GradientSum"]

logger = logging.getLogger("deeprfm")

#: Activation-sized buffers per cotangent during a batched backward pass (estimate).
BACKWARD_BUFFERS = 4


class GradientSum:
    """Running sum over samples, outputs (or projections) and positions of one layer's AGOP.

    Three accumulation spaces:

    - ``"output"`` (full form, k ≤ d): G = Σ g gᵀ (k × k) of the gradients g at the layer
      output, finished as Wᵀ G W;
    - ``"input"`` (full form, k > d): Σ (Wᵀg)(Wᵀg)ᵀ (d × d);
    - ``"input_diag"`` (diagonal form): Σ (Wᵀg)² (d,). Forming Wᵀg costs what the backward
      pass through the layer costs anyway, unlike the k²·d of diag(Wᵀ G W).

    Per-batch products run in the model's dtype; the sums are float64.
    """

    def __init__(self, weight: torch.Tensor, diagonal: bool, budget: int) -> None:
        k, d = weight.shape
        self.weight, self.budget = weight, budget
        if diagonal:
            self.space, size = "input_diag", (d,)
        else:
            self.space, size = ("output", (k, k)) if k <= d else ("input", (d, d))
        self.total = torch.zeros(size, dtype=torch.float64, device=weight.device)

    def add(self, rows: torch.Tensor) -> None:
        """Add gradients at the layer output, one row (k,) per sample, output and position."""
        if self.space == "output":
            self.total += (rows.T @ rows).to(torch.float64)
            return
        d = self.weight.shape[1]
        step = rows_per_block(self.budget, 2 * d * rows.element_size(), rows.shape[0])
        for start in range(0, rows.shape[0], step):
            inputs = rows[start : start + step] @ self.weight  # gradients at the input (r, d)
            if self.space == "input":
                self.total += (inputs.T @ inputs).to(torch.float64)
            else:
                self.total += (inputs * inputs).sum(dim=0).to(torch.float64)

    def finish(self, n: int) -> torch.Tensor:
        """The AGOP (d, d), or its diagonal (d,) in the diagonal form, averaged over n samples."""
        if self.space != "output":
            return self.total / n
        w = self.weight.to(torch.float64)
        agop = w.T @ self.total @ w / n
        return (agop + agop.T) / 2


class GradientPass:
    """The forward and batched backward pass that sums every layer's output gradients.

    Parameters
    ----------
    forms : dict of str to {"full", "diagonal"}
        Each layer's matrix form (:func:`deeprfm.probes.layers.matrix_form`).
    budget : int
        Memory budget in bytes for a chunk of cotangents and the gradient products.
    projections : OutputProjections
        The cotangents of the outputs (exact, or random projections).
    """

    def __init__(
        self,
        forms: dict[str, str],
        budget: int,
        projections: OutputProjections,
    ) -> None:
        self.forms, self.budget = forms, budget
        self.projections = projections
        self.layers: list[ProbedLayer] = []
        self.batched = True  # batched backward (is_grads_batched) until it proves unsupported
        self.chunk_cap = math.inf  # cotangents per backward, lowered after an out-of-memory
        self.positions: dict[str, int] = {}

    def run(
        self,
        layers: Sequence[ProbedLayer],
        batches: Callable[[str], Iterator[tuple[torch.Tensor, torch.Tensor | None]]],
        forward: Callable[[torch.Tensor, Iterable[str]], torch.Tensor],
    ) -> tuple[dict[str, GradientSum], PassRecord]:
        """One pass over ``batches("gradients")``: every layer's gradient sum and the record.

        ``forward(x, called)`` runs the model on a batch, given the names of the layers whose
        hooks fired; the layers that did not run in the first forward pass are left out.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "measure: the AGOP needs gradients, which torch.inference_mode() forbids; call "
                "measure outside it, or use agop=False"
            )
        deltas: dict[str, torch.Tensor] = {}

        def make_hook(layer: ProbedLayer) -> Callable[..., torch.Tensor]:
            def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor):
                if layer.name in deltas:
                    raise shared_layer_error(layer.name)
                # A zero leaf, expanded (no memory): its gradient is ∂f/∂output.
                delta = output.new_zeros(()).requires_grad_().expand(output.shape)
                deltas[layer.name] = delta
                return output + delta

            return hook

        sums: dict[str, GradientSum] = {}
        record = PassRecord()
        with torch.enable_grad(), forward_hooks(layers, make_hook):
            for x, y in batches("gradients"):
                deltas.clear()
                f = forward(x, deltas)
                record.add(x, y)
                if not sums:
                    self.layers = [layer for layer in layers if layer.name in deltas]
                    sums = {
                        layer.name: GradientSum(
                            module_matrix(layer.module),
                            self.forms[layer.name] == "diagonal",
                            self.budget,
                        )
                        for layer in self.layers
                    }
                    self.positions = {
                        layer.name: deltas[layer.name].numel() // (x.shape[0] * layer.shape[0])
                        for layer in self.layers
                    }
                self.backpropagate(f, deltas, sums)
        return sums, record

    def backpropagate(
        self, f: torch.Tensor, deltas: dict[str, torch.Tensor], sums: dict[str, GradientSum]
    ) -> None:
        """Add the output gradients of every layer, chunk of cotangents by chunk."""
        layers = [layer for layer in self.layers if layer.name in deltas]
        inputs = [deltas[layer.name] for layer in layers]
        if not f.requires_grad:  # no selected layer influences the output
            return
        cotangents = self.projections.cotangents(*f.shape, f)
        per_cotangent = BACKWARD_BUFFERS * sum(t.numel() for t in inputs) * f.element_size()
        start = 0
        while start < cotangents.shape[0]:
            chunk = min(self.chunk_cap, rows_per_block(self.budget, per_cotangent, len(cotangents)))
            block = cotangents[start : start + chunk]
            try:
                grads = self.gradients(f, inputs, block)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                self.chunk_cap = chunk // 2
                logger.warning("probe: out of memory; %d cotangents per backward", chunk // 2)
                continue
            for layer, grad in zip(layers, grads, strict=True):
                if grad is None:  # the layer's output does not reach the model output
                    continue
                channels_last = (
                    grad.movedim(-3, -1) if isinstance(layer.module, nn.Conv2d) else grad
                )
                sums[layer.name].add(channels_last.reshape(-1, layer.shape[0]))
            start += block.shape[0]

    def gradients(
        self, f: torch.Tensor, inputs: list[torch.Tensor], block: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients (m, *input.shape) of ⟨v, f⟩ for each cotangent v of ``block`` (m, b, c)."""
        if self.batched:
            try:
                return torch.autograd.grad(
                    f, inputs, block, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:
                self.batched = False
                warnings.warn(
                    f"probe: the model's backward pass cannot be batched over outputs ({err}); "
                    "falling back to one backward pass per output, which is slower",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
        rows = [
            torch.autograd.grad(f, inputs, v, retain_graph=True, allow_unused=True) for v in block
        ]
        return tuple(
            None if parts[0] is None else torch.stack(parts) for parts in zip(*rows, strict=True)
        )
