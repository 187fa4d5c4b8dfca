"""Probes on torch networks: per-layer NFM, AGOP and neural collapse (docs/design.md).

For a selected ``nn.Linear`` or ``nn.Conv2d`` layer with weight matrix ``W`` (k × d; a Conv2d
weight reshaped to (C_out, C_in·kh·kw), block-diagonal over groups) acting on the layer input
``h``, the layer output is ``W h`` (per position), so the gradient of any network output
``f_c`` with respect to the layer input is ``Wᵀ g_c``, ``g_c`` the gradient at the layer output.
Hence

    AGOP = (1/n) Σ_x Σ_c Σ_p Wᵀ g_{c,p}(x) g_{c,p}(x)ᵀ W = Wᵀ G W,

with ``p`` the positions (Conv2d patches, extra token dims of a Linear input; one for a plain
Linear) and ``G`` (k × k) accumulated from gradients at the layer outputs alone. A forward hook
returns ``out + δ`` with a zero leaf ``δ`` whose gradient is ``∂f/∂out``, so the trick also works
inside residual blocks and in front of in-place activations. All outputs are handled in one
batched backward pass per chunk (``is_grads_batched``), either one cotangent per output
(exact) or Gaussian random projections of the outputs (unbiased, for 1 000-class heads).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from analysis import METRICS, CollapseAccumulator, nfa_correlations
from analysis._common import user_stacklevel
from deeprfm._memory import memory_budget, resolve_device, rows_per_block
from deeprfm._probe_stages import (
    OUTPUT_STAGES,
    check_stages,
    following_activation,
    project,
    projection_matrix,
)
from deeprfm._validation import check_bool, check_number

__all__ = ["NeuralProbe"]

logger = logging.getLogger("deeprfm")

#: Number of random projections of the outputs that ``agop_outputs="random"`` uses.
DEFAULT_PROJECTIONS = 16
#: Rows per batch when ``measure`` is given a pair of tensors.
PAIR_BATCH_SIZE = 64
#: d × d float64 matrices alive per layer while its NFM, AGOP and NFA correlations are formed.
_MATRIX_COPIES = 6
#: Activation-sized buffers per cotangent during a batched backward pass (estimate).
_BACKWARD_BUFFERS = 4
#: Float64 vectors of length d per class that a layer's collapse statistics keep.
_COLLAPSE_VECTORS = 4
#: Name of a model that is itself the only selected layer.
_ROOT_NAME = "model"
_LAYER_TYPES = (nn.Linear, nn.Conv2d)
_NFA_REFERENCE = (
    "Radhakrishnan, Beaglehole, Pandit & Belkin (2024), Mechanism for feature learning in "
    "neural networks and backpropagation-free machine learning models, Science 383:1461-1467, "
    "arXiv:2212.13881; convolutions: Beaglehole, Radhakrishnan, Pandit & Belkin (2023), "
    "Mechanism of feature learning in convolutional neural networks, arXiv:2309.00570"
)
_AGOP_DEFINITION = (
    "(1/n) sum_x sum_c sum_p grad_p f_c(x) grad_p f_c(x)^T, the gradient of the model output "
    "f_c with respect to the layer input at position p (Conv2d: the C_in*kh*kw patch; Linear: "
    "the d_in vector) through this layer, summed over positions and outputs (or random "
    "projections of the outputs) and averaged over the n samples; computed as W^T G W"
)
# Root variables: name -> (Pearson or cosine, power of the AGOP, long_name).
_NFA_VARIABLES = {
    "nfa_corr": ("pearson", 0.5, "NFA correlation (Pearson) of NFM and AGOP^1/2"),
    "nfa_corr_agop1": ("pearson", 1.0, "NFA correlation (Pearson) of NFM and AGOP"),
    "nfa_cosine": ("cosine", 0.5, "NFA cosine similarity of NFM and AGOP^1/2"),
}

LayerSelection = Literal["auto"] | str | Sequence[str] | Callable[[str, nn.Module], bool]
Outputs = Literal["exact", "random"] | int


# --------------------------------------------------------------------------- layers
def _weight_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
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


def _module_matrix(module: nn.Module) -> torch.Tensor:
    return _weight_matrix(module.weight, getattr(module, "groups", 1))


@dataclass
class _Layer:
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
        w = _module_matrix(self.module)
        return w if self.init is None else w - self.init.to(w)


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Display name -> (module path, module) of every Linear / Conv2d, in definition order."""
    return {
        (path or _ROOT_NAME): (path, module)
        for path, module in model.named_modules()
        if isinstance(module, _LAYER_TYPES)
    }


def _select(model: nn.Module, layers: LayerSelection) -> dict[str, tuple[str, nn.Module]]:
    available = _candidates(model)
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


def _initial_matrix(init_weights: Any, path: str, module: nn.Module) -> torch.Tensor:
    """W₀ (k, d) of one layer from a module or a state dict, copied (training cannot alias it)."""
    if isinstance(init_weights, nn.Module):
        twin = dict(init_weights.named_modules()).get(path)
        if not isinstance(twin, _LAYER_TYPES):
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
    return _weight_matrix(weight, getattr(module, "groups", 1)).clone()


# --------------------------------------------------------------------------- AGOP sums
class _GradientSum:
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


# --------------------------------------------------------------------------- data
@dataclass
class _PassRecord:
    """What one pass over the data saw: sample count, labels and an order-free checksum."""

    n: int = 0
    labels: list[torch.Tensor] = field(default_factory=list)
    moments: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.n += x.shape[0]
        if y is not None:
            self.labels.append(y.cpu())
        sums = x.reshape(x.shape[0], -1).to(torch.float64).sum(dim=1).cpu()
        self.moments += torch.stack([sums.sum(), (sums * sums).sum()])

    def all_labels(self) -> torch.Tensor:
        return torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64)

    def same_samples(self, other: _PassRecord) -> bool:
        return (
            self.n == other.n
            and torch.equal(self.all_labels().sort().values, other.all_labels().sort().values)
            and bool(torch.allclose(self.moments, other.moments, rtol=1e-9, atol=1e-9))
        )


class _Source:
    """The batches of ``data``: a DataLoader, an iterable of (x, y) batches, or (X, y)."""

    def __init__(self, data: Any, passes: int) -> None:
        if isinstance(data, (str, bytes, torch.Tensor, np.ndarray)) or not isinstance(
            data, Iterable
        ):
            raise TypeError(
                "data: expected a DataLoader, an iterable of (x, y) batches or a pair of "
                f"tensors (X, y), got {type(data).__name__}"
            )
        self.pair = (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(a, (torch.Tensor, np.ndarray)) for a in data)
            and data[1].ndim == 1
            and data[0].ndim >= 1
        )
        if self.pair and len(data[0]) != len(data[1]):
            if data[0].ndim >= 2 and not torch.as_tensor(data[1]).is_floating_point():
                raise ValueError(
                    f"data: the pair (X, y) has {len(data[0])} inputs but {len(data[1])} labels"
                )
            self.pair = False
        if passes > 1 and isinstance(data, Iterator):
            raise TypeError(
                "data: a one-shot iterator cannot be passed over twice, and the collapse "
                "metrics need several passes; pass a DataLoader, a list of batches or a pair "
                "of tensors (X, y), or use collapse=False"
            )
        self.data = data
        if self.pair:
            self.total: int | None = math.ceil(len(data[0]) / PAIR_BATCH_SIZE)
        else:
            self.total = len(data) if hasattr(data, "__len__") else None

    def __iter__(self) -> Iterator[Any]:
        if not self.pair:
            yield from self.data
            return
        X, y = self.data
        for start in range(0, len(X), PAIR_BATCH_SIZE):
            yield X[start : start + PAIR_BATCH_SIZE], y[start : start + PAIR_BATCH_SIZE]


def _activation_module(layer: _Layer) -> nn.Module:
    return layer.activation[1]


@contextmanager
def _forward_hooks(
    layers: Sequence[_Layer],
    make_hook: Callable[[_Layer], Callable[..., Any]],
    module: Callable[[_Layer], nn.Module] = lambda layer: layer.module,
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
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
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


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _missed_activation_error(layers: Sequence[_Layer], pending: Mapping[str, Any]) -> ValueError:
    missed = {layer.name: layer.activation[0] for layer in layers if layer.name in pending}
    return ValueError(
        f"output_stage: the activations {missed} did not receive their layers' outputs in the "
        "forward pass (the model does not run them right after the layer); use "
        "output_stage='layer'"
    )


def _shared_layer_error(name: str) -> ValueError:
    return ValueError(
        f"layers: {name!r} ran more than once in one forward pass (a shared module); "
        "NeuralProbe needs each selected layer to run once per forward: exclude it with layers="
    )


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter (CPU, float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _projections(agop_outputs: Any) -> int | None:
    """Number of random projections of the outputs; None for the exact AGOP."""
    if isinstance(agop_outputs, str):
        if agop_outputs == "exact":
            return None
        if agop_outputs == "random":
            return DEFAULT_PROJECTIONS
        raise ValueError(
            f"agop_outputs: expected 'exact', 'random' or a positive int, got {agop_outputs!r}"
        )
    check_number(agop_outputs, "agop_outputs", integer=True, low=1)
    return int(agop_outputs)


class NeuralProbe:
    """Per-layer Neural Feature Matrix, AGOP and neural collapse of a torch network.

    Parameters
    ----------
    model : torch.nn.Module
        The network, e.g. a torchvision or timm MLP, VGG or ResNet; its forward pass maps a
        batch (b, ...) to outputs (b, c) (trailing dims are flattened into c). It is never
        moved, trained or modified.
    layers : "auto", str, sequence of str or callable, default "auto"
        ``"auto"``: every ``nn.Linear`` and ``nn.Conv2d`` (subclasses included) in definition
        order. Names are module paths (``"layer3.1.conv2"``); a model that is itself a Linear
        or Conv2d is called ``"model"``. A name or a list of names selects those layers, in
        that order; a callable ``(name, module) -> bool`` filters the Linear/Conv2d layers.
    agop : bool, default True
        Measure each layer's AGOP (one forward and batched backward pass over the data).
    nfm : bool, default True
        Compute each layer's Neural Feature Matrix ``WᵀW`` (no data needed).
    collapse : bool, default True
        Collapse metrics of each layer's features (``analysis.CollapseAccumulator``) at every
        stage of ``stages``; needs integer labels and data that can be passed over more than
        once.
    stages : sequence of {"input", "projected", "output"}, default ("input",)
        Where the collapse metrics are measured (Beaglehole et al. 2024, section 5): the
        layer's input h; ``projected``, the input times the right singular structure of the
        weight, (WᵀW)^{1/2} h (for a Conv2d every patch, see ``torch.nn.functional.unfold``);
        ``output``, the layer's output W h + b. NC1 is isometry invariant, so ``projected`` and
        a bias-free layer's own ``output`` have equal NC1: use ``output_stage="activation"``
        to see what the nonlinearity adds.
    output_stage : {"layer", "activation"}, default "layer"
        ``"layer"``: the ``output`` stage is the layer's output W h + b. ``"activation"``: the
        output of the activation that follows the layer in its parent module (the next child,
        when it is a parameter-free module of ``torch.nn.modules.activation`` such as
        ``nn.ReLU``); layers not followed by one keep their own output. The root coordinate
        ``output_source`` names the module whose output was taken.
    agop_outputs : "exact", "random" or int, default "exact"
        ``"exact"``: one cotangent per model output. An int ``m`` (``"random"``:
        :data:`DEFAULT_PROJECTIONS`): ``m`` Gaussian projections ``v ~ N(0, I/m)`` of the
        outputs, drawn afresh for every sample; unbiased since ``E[Σ_j Jᵀv_j v_jᵀJ] = JᵀJ``.
        Cheaper than exact when ``m`` is below the number of outputs (ImageNet heads).
    centered_nfm : bool, default False
        Use ``(W − W₀)ᵀ(W − W₀)`` as the NFM; ``W₀`` from ``init_weights``, or else the weights
        at the time the probe is constructed (build the probe before training).
    init_weights : torch.nn.Module or mapping, optional
        The model at initialisation (a module of the same architecture, or its
        ``state_dict()``) for ``centered_nfm``. The weights are copied on construction.
    device : str or torch.device, optional
        Where batches are sent and statistics accumulated; default the device of the model's
        first parameter. The model itself is not moved.
    max_samples : int, optional
        Use at most this many samples of ``data`` (the first ones it yields).
    random_state : int, optional
        Seed of the random projections.
    verbose : bool, default False
        Show a tqdm bar per pass over the data.

    Attributes
    ----------
    layer_names : list of str
        Names of the selected layers.
    memory_gb : float or None
        Memory budget in GiB (class default None: a safe fraction of the device's free memory,
        see docs/design.md, *The memory-budget contract*). Set it on an instance to change it.
        A layer whose d × d matrices would not fit is measured in *diagonal form* (see Notes).

    Notes
    -----
    ``measure`` runs the model in eval mode (BatchNorm statistics are used, not updated;
    dropout is off) with every parameter's ``requires_grad`` off, and restores each module's
    ``training`` flag and each parameter's ``requires_grad`` on exit, also after an exception;
    its hooks are removed on exit. Parameters, their ``.grad`` and the input tensors are never
    written to.

    **AGOP.** ``AGOP_l = (1/n) Σ_x Σ_c Σ_p ∇_p f_c(x) ∇_p f_c(x)ᵀ`` where ``∇_p`` is the
    gradient with respect to the layer input at position ``p`` *through this layer*: for a
    Conv2d the C_in·kh·kw patch at each output position (the convolutional AGOP of Beaglehole et
    al. 2023: summed over patch positions, averaged over samples), for a Linear the d_in input
    (positions are any extra leading dims, e.g. tokens). An input that also feeds a skip
    connection contributes only its path through the layer. Computed as ``Wᵀ G W`` from the
    gradients ``g`` at the layer output with ``G = (1/n) Σ g gᵀ`` (docs/design.md). A grouped or
    depthwise Conv2d uses the block-diagonal (C_out, C_in·kh·kw) weight, so NFM and AGOP are
    over the full C_in·kh·kw patch.

    **Memory fallback.** A layer whose d × d float64 matrices (about six alive at once while
    the NFM, AGOP and NFA correlation are formed) exceed the memory budget, such as the
    25 088-wide input of VGG's classifier, is measured in diagonal form: only the diagonals of
    its NFM and AGOP are kept (a ``RuntimeWarning`` names the layers) and its NFA correlations
    are NaN. A layer whose collapse statistics (``4·K·d`` float64 numbers for K classes and d
    input features) exceed the budget gets NaN collapse metrics, with a warning.

    Examples
    --------
    >>> probe = NeuralProbe(model)                                   # doctest: +SKIP
    >>> tree = probe.measure(loader)                                 # doctest: +SKIP
    >>> tree.ds.nfa_corr.sel(layer="fc")                             # doctest: +SKIP
    >>> tree["layers/layer1.0.conv1"].ds.agop                        # doctest: +SKIP
    """

    memory_gb: float | None = None

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelection = "auto",
        *,
        agop: bool = True,
        nfm: bool = True,
        collapse: bool = True,
        stages: Sequence[str] = ("input",),
        output_stage: str = "layer",
        agop_outputs: Outputs = "exact",
        centered_nfm: bool = False,
        init_weights: nn.Module | Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        max_samples: int | None = None,
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        for value, name in (
            (agop, "agop"),
            (nfm, "nfm"),
            (collapse, "collapse"),
            (centered_nfm, "centered_nfm"),
            (verbose, "verbose"),
        ):
            check_bool(value, name)
        if not (agop or nfm or collapse):
            raise ValueError("agop, nfm, collapse: at least one of them must be True")
        self._projections = _projections(agop_outputs)
        self._stages = check_stages(stages)
        if output_stage not in OUTPUT_STAGES:
            raise ValueError(f"output_stage: expected one of {OUTPUT_STAGES}, got {output_stage!r}")
        if centered_nfm and not nfm:
            raise ValueError("centered_nfm: needs nfm=True")
        if init_weights is not None and not centered_nfm:
            raise ValueError("init_weights: is only used with centered_nfm=True, which is off")
        if max_samples is not None:
            check_number(max_samples, "max_samples", integer=True, low=1)
        if random_state is not None:
            check_number(random_state, "random_state", integer=True, low=0)
        self._device = None if device is None else resolve_device(device)
        self.model = model
        self.layers = layers
        self.agop, self.nfm, self.collapse = agop, nfm, collapse
        self.stages, self.output_stage = stages, output_stage
        self.agop_outputs = agop_outputs
        self.centered_nfm = centered_nfm
        self.init_weights = init_weights
        self.device = device
        self.max_samples = max_samples
        self.random_state = random_state
        self.verbose = verbose
        self._layers: list[_Layer] = []
        for name, (path, module) in _select(model, layers).items():
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"layers: {name!r} is a lazy module with no weight yet; run one forward "
                    "pass before building the probe"
                )
            init = None
            if centered_nfm:
                init = (
                    _module_matrix(module).clone()
                    if init_weights is None
                    else _initial_matrix(init_weights, path, module)
                )
            activation = None
            if output_stage == "activation" and "output" in self._stages:
                activation = following_activation(model, path)
            self._layers.append(_Layer(name, path, module, init, activation))
        self._closed = False

    @property
    def layer_names(self) -> list[str]:
        """Names of the selected layers, in the order of the results."""
        return [layer.name for layer in self._layers]

    def __enter__(self) -> NeuralProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the layer table and the copies of the initial weights.

        Called on leaving a ``with`` block; :meth:`measure` then raises ``RuntimeError``.
        """
        self._layers = []
        self._closed = True

    def measure(self, data: Any) -> xr.DataTree:
        """Measure NFM, AGOP, NFA correlations and collapse metrics of every selected layer.

        Parameters
        ----------
        data : DataLoader, iterable of batches, or pair of tensors (X, y)
            Batches ``(x, y, ...)`` with inputs x (b, ...) and integer labels y (b,) (tensors or
            numpy arrays; floating inputs are cast to the model's dtype); without collapse a
            batch may be x alone. A pair (X (n, ...), y (n,)) is cut into batches of
            :data:`PAIR_BATCH_SIZE`. With ``collapse=True`` the data is passed over two or three
            times (gradients; collapse statistics; the second collapse pass for ``nc1`` and
            ``ncc_acc``) and every pass must yield the same samples (any order): use no
            shuffling together with ``max_samples``, and no random augmentation.

        Returns
        -------
        xarray.DataTree
            Root dataset with dim ``layer`` (coordinates ``layer`` (names), ``layer_type``,
            ``fan_in`` (d), ``matrix_form`` ("full" or "diagonal")) and variables
            ``nfa_corr`` (Pearson, NFM vs AGOP^1/2), ``nfa_corr_agop1`` (Pearson, NFM vs AGOP),
            ``nfa_cosine`` (cosine, NFM vs AGOP^1/2) when both matrices are measured, and
            every collapse metric of :data:`analysis.METRICS` that applies (``nc1``,
            ``nc1_trace``, ``tr_sw``, ``tr_sb``, ``cdnv``, ``nc2``, ``nc2_equinorm``,
            ``nc2_equiangle``, ``nc2_dnc``, ``ncc_acc``) of each layer's features, of dims
            (``layer``, ``stage``) with coordinate ``stage`` (the requested ``stages``) and,
            with the ``output`` stage, ``output_source`` (the module whose output it is); attrs
            ``config``, ``timings`` (JSON), ``num_samples`` and, with collapse, ``classes``
            (JSON list of the labels seen). One group per layer,
            ``layers/<name>``, holding ``nfm`` and ``agop`` of dims (``feature_i``,
            ``feature_j``) (float64, d × d), or ``nfm_diag`` and ``agop_diag`` of dim
            ``feature_i`` in diagonal form. Round-trips through netCDF
            (``tree.to_netcdf(path)``, ``xarray.open_datatree(path)``).

        Raises
        ------
        ValueError
            If the data is empty, has NaN/inf inputs or fewer than two classes (collapse), its
            passes yield different samples, or a selected layer runs more than once per
            forward pass (or not at all, for an explicit list of names).
        TypeError
            If ``data`` is not a supported kind, or is a one-shot iterator with collapse on.
        """
        if self._closed:
            raise RuntimeError("measure: the probe is closed")
        with _evaluation_mode(self.model):
            return _Measurement(self, data).run()


class _Measurement:
    """One call of :meth:`NeuralProbe.measure`: the passes over the data and the result."""

    def __init__(self, probe: NeuralProbe, data: Any) -> None:
        self.probe = probe
        self.model = probe.model
        model_device, self.dtype = _model_device_dtype(probe.model)
        self.device = probe._device or model_device
        self.budget = memory_budget(probe.memory_gb, self.device)
        self.source = _Source(data, passes=2 if probe.collapse else 1)
        self.layers = list(probe._layers)
        self.forms = {
            layer.name: (
                "full" if _MATRIX_COPIES * 8 * layer.shape[1] ** 2 <= self.budget else "diagonal"
            )
            for layer in self.layers
        }
        self.first_forward = True
        self.batched = True  # batched backward (is_grads_batched) until it proves unsupported
        self.chunk_cap = math.inf  # cotangents per backward, lowered after an out-of-memory
        self.positions: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.generator = torch.Generator()
        if probe.random_state is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(probe.random_state))

    # ------------------------------------------------------------------ driver
    def run(self) -> xr.DataTree:
        probe = self.probe
        diagonal = [name for name, form in self.forms.items() if form == "diagonal"]
        if diagonal and (probe.agop or probe.nfm):
            warnings.warn(
                f"layers {diagonal}: their d x d matrices exceed the memory budget of "
                f"{self.budget / 1024**3:.2f} GiB; only the diagonals of NFM and AGOP are kept "
                "and their NFA correlations are NaN",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        sums: dict[str, _GradientSum] = {}
        record = None
        if probe.agop:
            sums, record = self._timed("gradients", self.gradient_pass)
        elif probe.collapse:
            record = self._timed("labels", self.label_pass)
        collapse = self._timed("collapse", self.collapse_passes, record) if probe.collapse else {}
        matrices = self._timed("matrices", self.matrices, sums, record)
        nfa = self._timed("nfa", self.nfa_variables, matrices) if probe.agop and probe.nfm else {}
        logger.info(
            "probe: %d layers, %s samples, %s",
            len(self.layers),
            "no" if record is None else record.n,
            ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.timings.items()),
        )
        return self.assemble(matrices, nfa, collapse, record)

    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[phase] = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ data
    def batches(self, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Converted batches on the device, at most ``max_samples`` samples in all."""
        limit = self.probe.max_samples
        seen = 0
        with tqdm(
            self.source,
            desc=f"probe: {desc}",
            total=self.source.total if limit is None else None,
            disable=not self.probe.verbose,
            unit="batch",
        ) as bar:
            for raw in bar:
                x, y = self.convert(raw)
                if limit is not None:
                    x = x[: limit - seen]
                    y = None if y is None else y[: limit - seen]
                if x.shape[0] == 0:
                    continue
                seen += x.shape[0]
                yield x, y
                if limit is not None and seen >= limit:
                    return
        if seen == 0:
            raise ValueError("data: yielded no samples")

    def convert(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(raw, (tuple, list)):
            if not raw:
                raise ValueError("data: got an empty batch; expected (x, y)")
            x, y = raw[0], (raw[1] if len(raw) > 1 else None)
        else:
            x, y = raw, None
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"data: expected batches (x, y) of tensors or arrays, got x of type "
                f"{type(x).__name__}"
            )
        x = torch.as_tensor(x)
        if x.ndim == 0:
            raise ValueError("data: inputs must have a batch dimension, got a scalar")
        if x.is_floating_point():
            x = x.to(device=self.device, dtype=self.dtype, copy=True)
            if not bool(torch.isfinite(x).all()):
                raise ValueError("data: inputs contain NaN or infinite values")
        else:
            x = x.to(device=self.device, copy=True)
        if y is None:
            if self.probe.collapse:
                raise ValueError(
                    "data: collapse=True needs labels; batches must be (x, y) pairs "
                    "(or use collapse=False)"
                )
            return x, None
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"data: labels must be integer class labels, got dtype {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"data: labels must have shape ({x.shape[0]},) to match the inputs, got "
                f"{tuple(y.shape)}"
            )
        return x, y.to(device=self.device, dtype=torch.int64)

    def forward(self, x: torch.Tensor, called: Iterable[str]) -> torch.Tensor:
        """Model outputs as (b, c); after the first forward pass, drop layers that did not run."""
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(
                f"model: its forward pass must return a tensor (batch, ...) with batch = "
                f"{x.shape[0]}, got {shape}"
            )
        if self.first_forward:
            self.first_forward = False
            self.keep_layers_that_ran(set(called))
        return out.reshape(out.shape[0], -1)

    def keep_layers_that_ran(self, called: set[str]) -> None:
        missing = [layer.name for layer in self.layers if layer.name not in called]
        if not missing:
            return
        explicit = not callable(self.probe.layers) and self.probe.layers != "auto"
        if explicit or len(missing) == len(self.layers):
            raise ValueError(
                f"layers: {missing} did not run in the model's forward pass (their forward() "
                "is bypassed); select layers that run"
            )
        warnings.warn(
            f"layers {missing} did not run in the model's forward pass (their forward() is "
            "bypassed, as in nn.MultiheadAttention) and are left out",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        self.layers = [layer for layer in self.layers if layer.name in called]

    # ------------------------------------------------------------------ passes
    def label_pass(self) -> _PassRecord:
        """Only the labels (and checksum) of the data, without running the model."""
        record = _PassRecord()
        for x, y in self.batches("labels"):
            record.add(x, y)
        return record

    def gradient_pass(self) -> tuple[dict[str, _GradientSum], _PassRecord]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "measure: the AGOP needs gradients, which torch.inference_mode() forbids; call "
                "measure outside it, or use agop=False"
            )
        deltas: dict[str, torch.Tensor] = {}

        def make_hook(layer: _Layer) -> Callable[..., torch.Tensor]:
            def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor):
                if layer.name in deltas:
                    raise _shared_layer_error(layer.name)
                # A zero leaf, expanded (no memory): its gradient is ∂f/∂output.
                delta = output.new_zeros(()).requires_grad_().expand(output.shape)
                deltas[layer.name] = delta
                return output + delta

            return hook

        sums: dict[str, _GradientSum] = {}
        record = _PassRecord()
        with torch.enable_grad(), _forward_hooks(self.layers, make_hook):
            for x, y in self.batches("gradients"):
                deltas.clear()
                f = self.forward(x, deltas)
                record.add(x, y)
                if not sums:
                    sums = {
                        layer.name: _GradientSum(
                            _module_matrix(layer.module),
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

    def cotangents(self, f: torch.Tensor) -> torch.Tensor:
        """(m, b, c): unit vectors of the outputs (exact) or scaled Gaussian projections."""
        b, c = f.shape
        m = self.probe._projections
        if m is None:
            return torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, b, c)
        draws = torch.randn((m, b, c), generator=self.generator, dtype=torch.float64)
        return (draws / math.sqrt(m)).to(dtype=f.dtype, device=f.device)

    def backpropagate(
        self, f: torch.Tensor, deltas: dict[str, torch.Tensor], sums: dict[str, _GradientSum]
    ) -> None:
        """Add the output gradients of every layer, chunk of cotangents by chunk."""
        layers = [layer for layer in self.layers if layer.name in deltas]
        inputs = [deltas[layer.name] for layer in layers]
        if not f.requires_grad:  # no selected layer influences the output
            return
        cotangents = self.cotangents(f)
        per_cotangent = _BACKWARD_BUFFERS * sum(t.numel() for t in inputs) * f.element_size()
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

    def collapse_passes(self, reference: _PassRecord) -> dict[tuple[str, str], xr.Dataset | None]:
        """Collapse metrics of each layer's stages: the first pass, then a second if needed."""
        labels = reference.all_labels()
        classes = torch.unique(labels).to(self.device)
        if len(classes) < 2:
            raise ValueError(
                f"data: the collapse metrics need at least 2 classes, got labels {classes.tolist()}"
            )
        stages = self.probe._stages
        roots = self.projection_roots() if "projected" in stages else {}
        accumulators: dict[tuple[str, str], CollapseAccumulator | None] = {}
        called: set[str] = set()
        pending: dict[str, torch.Tensor] = {}  # layer outputs awaiting their activation
        state: dict[str, Any] = {}

        def accumulate(layer: _Layer, stage: str, features: torch.Tensor | None) -> None:
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
                    and _COLLAPSE_VECTORS * 8 * len(classes) * features[0].numel() <= self.budget
                )
                accumulators[key] = (
                    CollapseAccumulator(len(classes), device=self.device) if fits else None
                )
            acc = accumulators[key]
            if acc is not None:
                (acc.update_second_pass if state["second"] else acc.update)(features, index)

        def make_hook(layer: _Layer) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
                if layer.name in called:
                    raise _shared_layer_error(layer.name)
                called.add(layer.name)
                features = _layer_input(args, kwargs)
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

        def make_activation_hook(layer: _Layer) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
                if layer.name in pending and pending[layer.name] is _layer_input(args, kwargs):
                    del pending[layer.name]
                    accumulate(layer, "output", output)

            return hook

        activations = [layer for layer in self.layers if layer.activation is not None]
        for second in (False, True):
            if second and not any(
                a is not None and a.needs_second_pass for a in accumulators.values()
            ):
                break
            state["second"] = second
            record = _PassRecord()
            with (
                torch.no_grad(),
                _forward_hooks(self.layers, make_hook),
                _forward_hooks(activations, make_activation_hook, module=_activation_module),
            ):
                for x, y in self.batches(f"collapse pass {1 + second}"):
                    index = torch.searchsorted(classes, y).clamp_max(len(classes) - 1)
                    if not torch.equal(classes[index], y):
                        raise self.different_samples()
                    state["index"] = index
                    called.clear()
                    self.forward(x, called)
                    if pending:
                        raise _missed_activation_error(self.layers, pending)
                    record.add(x, y)
            if not record.same_samples(reference):
                raise self.different_samples()
        skipped = [
            f"{name} ({stage})" for (name, stage), acc in accumulators.items() if acc is None
        ]
        if skipped:
            warnings.warn(
                f"layers {skipped}: the collapse statistics of {len(classes)} classes x their "
                f"features exceed the memory budget of {self.budget / 1024**3:.2f} GiB (for the "
                "projected stage: the d x d matrix (W^T W)^1/2 does); their collapse metrics "
                "are NaN",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        return {key: None if acc is None else acc.result() for key, acc in accumulators.items()}

    def projection_roots(self) -> dict[str, torch.Tensor]:
        """(WᵀW)^{1/2} (d, d) of every layer whose d × d matrices fit the budget (full form)."""
        return {
            layer.name: projection_matrix(_module_matrix(layer.module).to(self.device))
            for layer in self.layers
            if self.forms[layer.name] == "full"
        }

    @staticmethod
    def different_samples() -> ValueError:
        return ValueError(
            "data: the passes over data yielded different samples (shuffling with "
            "max_samples, or random augmentation?); the collapse metrics need the same samples "
            "on every pass: iterate in a fixed order with deterministic transforms, or use "
            "collapse=False"
        )

    # ------------------------------------------------------------------ result
    def matrices(
        self, sums: dict[str, _GradientSum], record: _PassRecord | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: ``nfm`` and ``agop``, (d, d) float64 or their diagonals (d,)."""
        result: dict[str, dict[str, torch.Tensor]] = {}
        for layer in self.layers:
            entry = {}
            if self.probe.nfm:
                entry["nfm"] = self.nfm(layer.matrix(), self.forms[layer.name] == "diagonal")
            if self.probe.agop:
                entry["agop"] = sums[layer.name].finish(record.n)
            result[layer.name] = entry
        return result

    def nfm(self, w: torch.Tensor, diagonal: bool) -> torch.Tensor:
        """WᵀW (d, d) in float64, or its diagonal (d,) from row blocks of W (no float64 copy)."""
        if not diagonal:
            w = w.to(torch.float64)
            return w.T @ w
        k, d = w.shape
        step = rows_per_block(self.budget, 2 * d * 8, k)
        return sum((w[i : i + step].to(torch.float64) ** 2).sum(dim=0) for i in range(0, k, step))

    def assemble(
        self,
        matrices: dict[str, dict[str, torch.Tensor]],
        nfa: dict[str, Any],
        collapse: dict[tuple[str, str], xr.Dataset | None],
        record: _PassRecord | None,
    ) -> xr.DataTree:
        probe, names = self.probe, [layer.name for layer in self.layers]
        data_vars: dict[str, Any] = dict(nfa)
        coords: dict[str, Any] = {
            "layer": names,
            "layer_type": ("layer", [layer.kind for layer in self.layers]),
            "fan_in": ("layer", [layer.shape[1] for layer in self.layers]),
            "matrix_form": ("layer", [self.forms[name] for name in names]),
        }
        if probe.collapse:
            data_vars.update(_collapse_variables(names, probe._stages, collapse))
            coords["stage"] = list(probe._stages)
        if "output" in probe._stages:
            coords["output_source"] = (
                "layer",
                [
                    layer.path if layer.activation is None else layer.activation[0]
                    for layer in self.layers
                ],
                {
                    "long_name": "module whose output is the output stage",
                    "definition": "the layer itself (its output W h + b) or the activation "
                    "module that follows it (output_stage='activation')",
                },
            )
        config = {
            "agop": probe.agop,
            "nfm": probe.nfm,
            "collapse": probe.collapse,
            "stages": list(probe._stages),
            "output_stage": probe.output_stage,
            "agop_outputs": probe.agop_outputs,
            "projections": probe._projections,
            "centered_nfm": probe.centered_nfm,
            "max_samples": probe.max_samples,
            "random_state": probe.random_state,
            "memory_budget_bytes": self.budget,
            "model": type(probe.model).__name__,
        }
        attrs = {
            "config": json.dumps(config),
            "timings": json.dumps({k: round(v, 4) for k, v in self.timings.items()}),
            "num_samples": 0 if record is None else record.n,
        }
        if probe.collapse:
            attrs["classes"] = json.dumps(torch.unique(record.all_labels()).tolist())
        root = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        groups = {
            f"layers/{layer.name}": self.layer_group(layer, matrices[layer.name])
            for layer in self.layers
        }
        return xr.DataTree.from_dict({"/": root, **groups})

    def nfa_variables(self, matrices: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        names = [layer.name for layer in self.layers]
        full = [name for name in names if self.forms[name] == "full"]
        values = {var: np.full(len(names), np.nan) for var in _NFA_VARIABLES}
        reference = _NFA_REFERENCE
        if full:
            corr = nfa_correlations(
                {name: matrices[name]["nfm"] for name in full},
                {name: matrices[name]["agop"] for name in full},
                powers=(0.5, 1.0),
                methods=("pearson", "cosine"),
            )
            for var, (method, power, _) in _NFA_VARIABLES.items():
                picked = corr[f"nfa_{method}"].sel(power=power)
                for name in full:
                    values[var][names.index(name)] = float(picked.sel(layer=name))
        nfm_kind = "(W - W0)^T (W - W0)" if self.probe.centered_nfm else "W^T W"
        return {
            var: (
                "layer",
                values[var],
                {
                    "long_name": long_name,
                    "definition": (
                        f"{'Pearson correlation' if method == 'pearson' else 'cosine similarity'}"
                        f" of the flattened NFM = {nfm_kind} and AGOP^{power:g} (eigh, negative "
                        "eigenvalues clamped); NaN for layers in diagonal form"
                    ),
                    "reference": reference,
                },
            )
            for var, (method, power, long_name) in _NFA_VARIABLES.items()
        }

    def layer_group(self, layer: _Layer, entry: dict[str, torch.Tensor]) -> xr.Dataset:
        diagonal = self.forms[layer.name] == "diagonal"
        dims = ("feature_i",) if diagonal else ("feature_i", "feature_j")
        suffix = "_diag" if diagonal else ""
        nfm_kind = "(W - W0)^T (W - W0)" if self.probe.centered_nfm else "W^T W"
        meaning = {
            "nfm": ("Neural Feature Matrix", f"{nfm_kind}, W the (k, d) weight matrix"),
            "agop": ("Average Gradient Outer Product", _AGOP_DEFINITION),
        }
        data_vars = {
            f"{key}{suffix}": (
                dims,
                value.cpu().numpy(),
                {
                    "long_name": meaning[key][0] + (" (diagonal)" if diagonal else ""),
                    "definition": meaning[key][1],
                },
            )
            for key, value in entry.items()
        }
        attrs = {
            "layer_type": layer.kind,
            "weight_shape": json.dumps(list(layer.module.weight.shape)),
            "fan_in": layer.shape[1],
            "matrix_form": self.forms[layer.name],
        }
        if layer.name in self.positions:
            attrs["positions"] = self.positions[layer.name]
        return xr.Dataset(data_vars, attrs=attrs)


def _collapse_variables(
    names: list[str],
    stages: Sequence[str],
    results: dict[tuple[str, str], xr.Dataset | None],
) -> dict[str, Any]:
    """Collapse metrics along (``layer``, ``stage``), NaN where a layer's metrics were skipped."""
    done = [ds for ds in results.values() if ds is not None]
    return {
        metric: (
            ("layer", "stage"),
            np.array(
                [
                    [
                        np.nan
                        if results.get((name, stage)) is None
                        else float(results[name, stage][metric])
                        for stage in stages
                    ]
                    for name in names
                ]
            ),
            next(ds[metric].attrs for ds in done if metric in ds),
        )
        for metric in METRICS
        if any(metric in ds for ds in done)
    }
