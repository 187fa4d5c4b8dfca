"""NeuralProbe: per-layer NFM, AGOP, NFA correlations and collapse of a torch network.

The probe orchestrates one measurement: it selects the layers (:mod:`.layers`), puts the model in
evaluation mode and hooks it (:mod:`.hooks`), runs the gradient pass (:mod:`.gradients`) and the
collapse passes (:mod:`.collapse`, :mod:`.stages`) over the batches (:mod:`.batches`), and
assembles the DataTree (:mod:`.result`). See docs/design.md, *The probe's AGOP*.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from analysis._common import user_stacklevel
from deeprfm._memory import memory_budget, resolve_device
from deeprfm._validation import check_bool, check_number
from deeprfm.agop import OutputProjections, check_agop_outputs
from deeprfm.probes.batches import PassRecord, Source, convert_batch
from deeprfm.probes.collapse import collapse_passes
from deeprfm.probes.gradients import GradientPass, GradientSum
from deeprfm.probes.hooks import evaluation_mode
from deeprfm.probes.layers import (
    LayerSelection,
    ProbedLayer,
    initial_matrix,
    matrix_form,
    model_device_dtype,
    module_matrix,
    select_layers,
)
from deeprfm.probes.result import Result
from deeprfm.probes.settings import ProbeSettings
from deeprfm.probes.stages import OUTPUT_STAGES, check_stages, following_activation

__all__ = ["NeuralProbe"]

logger = logging.getLogger("deeprfm")

Outputs = Literal["exact", "random"] | int


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
        Cheaper than exact when ``m`` is below the number of outputs (ImageNet heads). The same
        parameter and draws as :func:`deeprfm.agop` (:class:`deeprfm.agop.OutputProjections`):
        the estimate depends on ``random_state``, not on the batch size.
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
        projections = check_agop_outputs(agop_outputs)
        stages = check_stages(stages)
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
        self._settings = ProbeSettings(
            agop=agop,
            nfm=nfm,
            collapse=collapse,
            stages=stages,
            output_stage=output_stage,
            agop_outputs=agop_outputs,
            projections=projections,
            centered_nfm=centered_nfm,
            max_samples=max_samples,
            random_state=random_state,
            verbose=verbose,
            explicit_layers=not callable(layers) and layers != "auto",
            model_name=type(model).__name__,
            device=None if device is None else resolve_device(device),
        )
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
        self._layers: list[ProbedLayer] = []
        for name, (path, module) in select_layers(model, layers).items():
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"layers: {name!r} is a lazy module with no weight yet; run one forward "
                    "pass before building the probe"
                )
            init = None
            if centered_nfm:
                init = (
                    module_matrix(module).clone()
                    if init_weights is None
                    else initial_matrix(init_weights, path, module)
                )
            activation = None
            if output_stage == "activation" and "output" in stages:
                activation = following_activation(model, path)
            self._layers.append(ProbedLayer(name, path, module, init, activation))
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
        with evaluation_mode(self.model):
            return _Measurement(
                self._settings, self.model, self._layers, self.memory_gb, data
            ).run()


class _Measurement:
    """One call of :meth:`NeuralProbe.measure`: the passes over the data and the result."""

    def __init__(
        self,
        settings: ProbeSettings,
        model: nn.Module,
        layers: Sequence[ProbedLayer],
        memory_gb: float | None,
        data: Any,
    ) -> None:
        self.settings, self.model = settings, model
        model_device, self.dtype = model_device_dtype(model)
        self.device = settings.device or model_device
        self.budget = memory_budget(memory_gb, self.device)
        self.source = Source(data, passes=2 if settings.collapse else 1)
        self.layers = list(layers)
        self.forms = {layer.name: matrix_form(layer, self.budget) for layer in self.layers}
        self.first_forward = True
        self.timings: dict[str, float] = {}
        self.projections = OutputProjections(settings.agop_outputs, settings.random_state)

    # ------------------------------------------------------------------ driver
    def run(self) -> xr.DataTree:
        settings = self.settings
        diagonal = [name for name, form in self.forms.items() if form == "diagonal"]
        if diagonal and (settings.agop or settings.nfm):
            warnings.warn(
                f"layers {diagonal}: their d x d matrices exceed the memory budget of "
                f"{self.budget / 1024**3:.2f} GiB; only the diagonals of NFM and AGOP are kept "
                "and their NFA correlations are NaN",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        sums: dict[str, GradientSum] = {}
        record, positions = None, {}
        if settings.agop:
            gradients = GradientPass(self.forms, self.budget, self.projections)
            sums, record = self._timed(
                "gradients", gradients.run, self.layers, self.batches, self.forward
            )
            positions = gradients.positions
        elif settings.collapse:
            record = self._timed("labels", self.label_pass)
        collapse = {}
        if settings.collapse:
            collapse = self._timed(
                "collapse",
                collapse_passes,
                self.layers,
                settings.stages,
                self.forms,
                self.budget,
                self.device,
                record,
                self.batches,
                self.forward,
            )
        result = Result(settings, self.layers, self.forms, self.budget)
        matrices = self._timed("matrices", result.matrices, sums, record)
        nfa = {}
        if settings.agop and settings.nfm:
            nfa = self._timed("nfa", result.nfa_variables, matrices)
        logger.info(
            "probe: %d layers, %s samples, %s",
            len(self.layers),
            "no" if record is None else record.n,
            ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.timings.items()),
        )
        return result.assemble(matrices, nfa, collapse, record, positions, self.timings)

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
        limit = self.settings.max_samples
        seen = 0
        with tqdm(
            self.source,
            desc=f"probe: {desc}",
            total=self.source.total if limit is None else None,
            disable=not self.settings.verbose,
            unit="batch",
        ) as bar:
            for raw in bar:
                x, y = convert_batch(raw, self.device, self.dtype, self.settings.collapse)
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
        if self.settings.explicit_layers or len(missing) == len(self.layers):
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
    def label_pass(self) -> PassRecord:
        """Only the labels (and checksum) of the data, without running the model."""
        record = PassRecord()
        for x, y in self.batches("labels"):
            record.add(x, y)
        return record
