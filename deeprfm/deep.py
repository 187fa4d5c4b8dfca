"""Deep RFM: layers of RFM → AGOP projection → random features, with collapse per layer.

Layer l takes features X_l (the inputs for l = 0, else the previous layer's random
features; by default rows scaled to unit norm on entering every layer, as in the paper's code),
fits an RFM on (X_l, y), takes its learned metric M_l (the normalised AGOP), projects
X̃_l = X_l M_l^{1/2} and maps X_{l+1} = φ_l(X̃_l) with a random feature map. Every layer's
RFM is a predictor; the last one's is the model's. The neural-collapse metrics of X_l, X̃_l and
φ_l(X̃_l) are recorded at every layer (Beaglehole, Súkeník, Mondelli, Belkin, NeurIPS 2024).

Only the training inputs entering layer 0 are stored: a layer's kernel centres are the
training inputs sent through the earlier layers' maps, recomputed when predicting, so no more
than one layer's features are ever held in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from analysis import collapse_metrics
from deeprfm._classes import (
    check_classes,
    check_targets,
    class_codes,
    decision_scores,
    encode_labels,
    known_labels,
)
from deeprfm._diagnostics import check_outputs
from deeprfm._memory import check_fits, memory_budget, resolve_device, resolve_dtype
from deeprfm._records import labelled_record
from deeprfm._validation import as_numpy, check_bool, check_number, to_tensor
from deeprfm.agop import psd_power
from deeprfm.features import FEATURE_MAPS, RandomFeatureMap
from deeprfm.kernels import Kernel, make_kernel
from deeprfm.persist import (
    check_tensors,
    jsonable_params,
    load_state,
    model_file_errors,
    params_json,
    restore_params,
    save_state,
)
from deeprfm.rfm import RFMClassifier, check_eval_set, metric_bytes

__all__ = ["DeepRFM", "DeepRFMLayer", "unit_rows"]

logger = logging.getLogger("deeprfm")

#: RFM parameters a DeepRFM passes through to every layer, with their defaults.
_RFM_DEFAULTS = {
    name: RFMClassifier().get_params()[name]
    for name in (
        "exponent",
        "diag",
        "centering",
        "agop_power",
        "agop_samples",
        "normalize",
    )
}
STAGES = ("input", "projected", "features")
#: Where ``normalize_rows`` scales rows to unit norm: on entering every layer, only the first.
ROW_NORMALIZATIONS = ("every_layer", "input", None)
_LAYER_ATTRS = {
    "train_acc": (
        "training accuracy of the layer's RFM",
        "fraction of training points whose argmax output is the label",
    ),
    "eval_acc": (
        "eval_set accuracy of the layer's RFM",
        "fraction of eval_set points whose argmax output is the label",
    ),
    "rfm_seconds": ("seconds fitting the layer's RFM", "wall-clock seconds of the RFM fit"),
    "map_seconds": (
        "seconds projecting and mapping",
        "wall-clock seconds of M^(1/2) and the random feature map on the training features",
    ),
    "collapse_seconds": (
        "seconds measuring collapse",
        "wall-clock seconds of the collapse metrics (and the eval_set pass)",
    ),
}


@dataclass
class DeepRFMLayer:
    """One fitted layer.

    Attributes
    ----------
    M : torch.Tensor, shape (d_l, d_l)
        Learned metric of the layer's RFM (its normalised AGOP).
    M_sqrt : torch.Tensor, shape (d_l, d_l)
        M^{1/2}, the projection applied to the layer's input.
    feature_map : RandomFeatureMap
        Map from the projected input (d_l) to the next layer's features (width).
    alpha : torch.Tensor, shape (n_train, n_classes)
        Coefficients of the layer's RFM; its centres are the training inputs of the layer.
    history : xarray.Dataset
        The layer RFM's per-iteration history.
    """

    M: torch.Tensor
    M_sqrt: torch.Tensor
    feature_map: RandomFeatureMap
    alpha: torch.Tensor
    history: xr.Dataset

    def project(self, X: torch.Tensor) -> torch.Tensor:
        """X̃ = X M^{1/2}, shape (n, d_l)."""
        return X @ self.M_sqrt

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Next layer's features φ(X M^{1/2}), shape (n, width)."""
        return self.feature_map.transform(self.project(X))

    def stages(self, X: torch.Tensor, upto: str = "features") -> dict[str, torch.Tensor]:
        """The layer's stages of features X (n, d_l) entering it, up to the stage ``upto``.

        Returns ``{"input": X, "projected": X M^{1/2}, "features": φ(X M^{1/2})}``, without the
        stages after ``upto``.
        """
        stages = {"input": X}
        if upto != "input":
            stages["projected"] = self.project(X)
        if upto == "features":
            stages["features"] = self.feature_map.transform(stages["projected"])
        return stages


def unit_rows(X: torch.Tensor) -> torch.Tensor:
    """Rows of X (n, d) scaled to unit Euclidean norm; zero rows stay zero.

    Each row is first divided by its largest absolute entry, so that norms of huge (float32
    1e20) or tiny rows neither overflow nor underflow. Returns a new tensor.
    """
    peak = X.abs().amax(dim=1, keepdim=True)
    X = X / torch.where(peak > 0, peak, torch.ones_like(peak))
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
    return X / torch.where(norms > 0, norms, torch.ones_like(norms))


class DeepRFM(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Deep Recursive Feature Machine classifier.

    Parameters
    ----------
    layers : int
        Number of layers L ≥ 1.
    width : int or None
        Output dimension of each random feature map; ``None``: the layer's input dimension
        (the paper's choice for Laplace random Fourier features).
    feature_map : {"relu", "laplace_rff"}
        ReLU random features (:class:`~deeprfm.features.ReLURandomFeatures`) or Laplace random
        Fourier features (:class:`~deeprfm.features.LaplaceRandomFeatures`).
    feature_params : dict, optional
        Keyword arguments of the layer's feature map besides ``width``: ``{"init": "torch",
        "bias": False}`` for ReLU features (the paper's ``nn.Linear`` weights), ``{"scale":
        0.5}`` for Laplace features (the paper's γ). An unknown key raises ``ValueError``.
    kernel : {"laplace", "gaussian", "gen_laplace"} or Kernel
        Kernel of every layer's RFM.
    bandwidth : float
        Kernel bandwidth L > 0.
    reg : float
        Ridge λ ≥ 0 of every layer's RFM.
    rfm_iters : int
        AGOP iterations of every layer's RFM (the paper uses 1).
    normalize_rows : {"every_layer", "input", None}
        Scale every row to unit Euclidean norm on entering every layer (the paper's code),
        only before the first layer, or never.
    targets : {"onehot", "pm1"}
        Regression codes of the classes in every layer's RFM: one-hot {0, 1} or ±1 (the
        paper's). ``predict`` is the argmax either way.
    solver : {"auto", "direct", "eigenpro"}
        Kernel solver of every layer ("auto": EigenPro when the direct solve does not fit).
    device : str or torch.device, optional
        Computation device; default CUDA when available, else CPU.
    dtype : torch.float32 or torch.float64
    memory_gb : float, optional
        Memory budget of the blocked computations.
    random_state : int, optional
        Seeds the random feature maps, the AGOP subsamples and iterative solvers.
    verbose : bool
        Progress bar over layers.
    **rfm_params
        Further RFM parameters applied in every layer: ``exponent``, ``diag``, ``centering``,
        ``agop_power``, ``agop_samples``, ``normalize``.

    Attributes
    ----------
    classes_ : ndarray, shape (n_classes,)
    layers_ : list of DeepRFMLayer
    collapse_ : xarray.Dataset
        Dims (``layer``, ``stage``), stage ∈ {input, projected, features}: every collapse
        metric of the training features (``nc1``, ``nc1_trace``, ``nc2``, ...), of the eval
        features when ``eval_set`` is given (prefixed ``eval_``), and per layer ``train_acc``,
        ``eval_acc`` and seconds. ``input`` is X_l after the row normalisation of the layer.
    X_fit_ : torch.Tensor, shape (n_samples, n_features)
        The training inputs entering layer 0 (row-normalised unless ``normalize_rows=None``),
        a copy owned by the model.
    n_features_in_ : int
    """

    def __init__(
        self,
        layers: int = 5,
        width: int | None = 1024,
        feature_map: str = "relu",
        kernel: str | Kernel = "laplace",
        bandwidth: float = 10.0,
        reg: float = 1e-3,
        rfm_iters: int = 1,
        normalize_rows: str | None = "every_layer",
        solver="auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        memory_gb: float | None = None,
        random_state: int | None = None,
        verbose: bool = False,
        feature_params: dict | None = None,
        targets: str = "onehot",
        **rfm_params,
    ) -> None:
        unknown = sorted(set(rfm_params) - set(_RFM_DEFAULTS))
        if unknown:
            raise TypeError(
                f"DeepRFM got unexpected keyword arguments {unknown}; "
                f"RFM parameters it passes on are {sorted(_RFM_DEFAULTS)}"
            )
        self.layers = layers
        self.width = width
        self.feature_map = feature_map
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.reg = reg
        self.rfm_iters = rfm_iters
        self.normalize_rows = normalize_rows
        self.solver = solver
        self.device = device
        self.dtype = dtype
        self.memory_gb = memory_gb
        self.random_state = random_state
        self.verbose = verbose
        self.feature_params = feature_params
        self.targets = targets
        for name, default in _RFM_DEFAULTS.items():
            setattr(self, name, rfm_params.get(name, default))

    def get_params(self, deep: bool = True) -> dict:
        """Parameters, including the RFM parameters passed through ``**rfm_params``."""
        return super().get_params(deep) | {name: getattr(self, name) for name in _RFM_DEFAULTS}

    # -- fitting -------------------------------------------------------------------------

    def _layer_rfm(self, seed: int) -> RFMClassifier:
        return RFMClassifier(
            kernel=self.kernel,
            bandwidth=self.bandwidth,
            reg=self.reg,
            iters=self.rfm_iters,
            solver=self.solver,
            early_stopping=False,
            device=self.device,
            dtype=self.dtype,
            memory_gb=self.memory_gb,
            random_state=seed,
            targets=self.targets,
            **{name: getattr(self, name) for name in _RFM_DEFAULTS},
        )

    def _check_params(self) -> None:
        check_number(self.layers, "layers", integer=True, low=1)
        if self.width is not None:
            check_number(self.width, "width", integer=True, low=1)
        check_number(self.rfm_iters, "rfm_iters", integer=True, low=0)
        if self.normalize_rows not in ROW_NORMALIZATIONS:
            raise ValueError(
                f"normalize_rows must be one of {ROW_NORMALIZATIONS}, got {self.normalize_rows!r}"
            )
        check_targets(self.targets)
        check_bool(self.verbose, "verbose")
        self._feature_map(1)  # validates feature_map and feature_params
        make_kernel(self.kernel, self.bandwidth, self.exponent)

    def _feature_map(self, n_features: int) -> RandomFeatureMap:
        """An unfitted feature map for a layer whose input has ``n_features`` dimensions."""
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        params = {} if self.feature_params is None else self.feature_params
        if not isinstance(params, dict):
            raise TypeError(f"feature_params must be a dict or None, got {type(params).__name__}")
        cls = FEATURE_MAPS[self.feature_map]
        accepted = cls.parameters()
        unknown = sorted(set(params) - set(accepted), key=str)
        if unknown:
            hint = " (give the width as DeepRFM(width=...))" if "width" in unknown else ""
            raise ValueError(
                f"feature_params: unknown key {unknown[0]!r} for feature_map="
                f"{self.feature_map!r}{hint}; accepted keys: {accepted}"
            )
        return cls(width=n_features if self.width is None else self.width, **params)

    def _rescale(self, H: torch.Tensor, layer: int) -> torch.Tensor:
        """Features entering ``layer``: rows scaled to unit norm where ``normalize_rows`` asks."""
        if self.normalize_rows == "every_layer" or (self.normalize_rows == "input" and not layer):
            return unit_rows(H)
        return H

    def fit(self, X, y, eval_set=None):
        """Fit the layers one after another.

        Parameters
        ----------
        X : array-like or torch.Tensor, shape (n_samples, n_features)
        y : array-like, shape (n_samples,)
            Class labels of any type.
        eval_set : tuple (X_val, y_val), optional
            Held-out data: its accuracy and collapse metrics are recorded at every layer.

        Returns
        -------
        self
        """
        self._check_params()
        X, y = validate_data(self, as_numpy(X), as_numpy(y), dtype=[np.float64, np.float32])
        self.classes_, labels = encode_labels(y)
        H = self._inputs(X)
        Y = to_tensor(class_codes(labels, len(self.classes_), self.targets), H.device, H.dtype)
        evaluation = None
        if eval_set is not None:
            X_val, y_val = check_eval_set(eval_set, self.n_features_in_)
            evaluation = (self._inputs(X_val), known_labels(y_val, self.classes_))
        self._check_memory(H)
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(2**31 - 1)))
        self.X_fit_ = H.clone() if self.normalize_rows is None else H  # never the caller's
        self.layers_, records = [], []
        for layer in tqdm(range(self.layers), desc="Deep RFM", disable=not self.verbose):
            record, H, evaluation = self._fit_layer(
                H, Y, labels, evaluation, int(rng.randint(2**31 - 1)), generator
            )
            records.append(record)
            logger.info("Deep RFM layer %d: train acc %.4f", layer, record["train_acc"])
        self.collapse_ = self._collapse_dataset(records)
        return self

    def _check_memory(self, H: torch.Tensor) -> None:
        """Refuse up front a width whose layers cannot fit (see :func:`check_fits`)."""
        n, d = H.shape
        if self.width is None:  # every layer as wide as the input: the RFM's check covers it
            return
        width = self.width
        needed = (
            (metric_bytes(width) if self.layers > 1 else 0)  # the next layer's RFM metric
            + 8 * width * (max(d, width) + 1)  # a feature map's float64 draws
            + 2 * n * width * H.element_size()  # one layer's features and the next's
        )
        check_fits(
            needed,
            memory_budget(self.memory_gb, H.device),
            H.device,
            f"DeepRFM(width={width}) on {n} points (a layer's features, random weights and "
            "the next layer's d x d metric)",
            "use a smaller width or a larger memory_gb",
        )

    def _fit_layer(self, H, Y, labels, evaluation, seed, generator):
        """Fit one layer on the features H (n, d_l) entering it.

        Returns the layer's record, the training features entering the next layer and the
        eval_set pair (features entering the next layer, labels).
        """
        start = time.perf_counter()
        index = len(self.layers_)
        rfm = self._layer_rfm(seed)
        rfm._fit_encoded(H, Y, self.classes_)
        fitted = time.perf_counter()
        feature_map = self._feature_map(H.shape[1])
        feature_map.fit(H.shape[1], generator=generator, device=H.device, dtype=H.dtype)
        layer = DeepRFMLayer(
            rfm._M_fit, psd_power(rfm._M_fit, 0.5), feature_map, rfm._alpha_fit, rfm.history_
        )
        self.layers_.append(layer)
        stages = layer.stages(H)
        mapped = time.perf_counter()
        record = {
            "train_acc": float(rfm.history_["train_acc"][rfm.best_iter_]),
            "train": {name: collapse_metrics(f, labels) for name, f in stages.items()},
        }
        if evaluation is not None:
            H_val, labels_val = evaluation
            outputs = rfm.kernel_.apply(H_val, H, rfm._alpha_fit, rfm._M_fit)
            record["eval_acc"] = float((outputs.argmax(dim=1).cpu().numpy() == labels_val).mean())
            val_stages = layer.stages(H_val)
            record["eval"] = {
                name: collapse_metrics(f, labels_val) for name, f in val_stages.items()
            }
            evaluation = (self._rescale(val_stages["features"], index + 1), labels_val)
        end = time.perf_counter()
        record |= {
            "rfm_seconds": fitted - start,
            "map_seconds": mapped - fitted,
            "collapse_seconds": end - mapped,
        }
        return record, self._rescale(stages["features"], index + 1), evaluation

    def _collapse_dataset(self, records: list[dict]) -> xr.Dataset:
        parts = []
        for prefix in ("train", "eval"):
            if prefix not in records[0]:
                continue
            per_layer = [
                xr.concat([rec[prefix][s] for s in STAGES], dim="stage") for rec in records
            ]
            metrics = xr.concat(per_layer, dim="layer")
            if prefix == "eval":
                metrics = metrics.rename({name: f"eval_{name}" for name in metrics.data_vars})
            parts.append(metrics)
        columns = {
            name: [rec[name] for rec in records] for name in _LAYER_ATTRS if name in records[0]
        }
        per_layer = labelled_record(columns, "layer", range(len(records)), _LAYER_ATTRS)
        collapse = xr.merge(parts, combine_attrs="drop_conflicts")
        collapse = collapse.assign_coords(layer=np.arange(len(records)), stage=list(STAGES))
        collapse = collapse.merge(per_layer)
        collapse.attrs = {"model": "DeepRFM", "params": params_json(self)}
        return collapse

    # -- transforming and predicting -----------------------------------------------------

    def _inputs(self, X: np.ndarray) -> torch.Tensor:
        """Validated inputs as a tensor on the device, as they enter layer 0."""
        H = to_tensor(X, resolve_device(self.device), resolve_dtype(self.dtype))
        return self._rescale(H, 0)

    def _new_inputs(self, X) -> torch.Tensor:
        check_is_fitted(self, "layers_")
        X = validate_data(self, as_numpy(X), reset=False, dtype=[np.float64, np.float32])
        return self._inputs(X)

    def transform(self, X, layer: int = -1, stage: str = "input") -> np.ndarray:
        """Features of new data at a layer.

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
        layer : int
            Layer index (negative counts from the end).
        stage : {"input", "projected", "features"}
            The features entering the layer (X_l, after the layer's row normalisation), after
            its AGOP projection (X̃_l), or the random features it outputs (φ_l(X̃_l), before
            the next layer's row normalisation).

        Returns
        -------
        ndarray, shape (n_samples, d_l) or (n_samples, width)
        """
        H = self._new_inputs(X)
        index = self._layer_index(layer)
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        for previous, fitted in enumerate(self.layers_[:index]):
            H = self._rescale(fitted.forward(H), previous + 1)
        return self.layers_[index].stages(H, upto=stage)[stage].cpu().numpy()

    def _layer_index(self, layer: int) -> int:
        check_number(layer, "layer", integer=True)
        if not -len(self.layers_) <= layer < len(self.layers_):
            raise ValueError(
                f"layer must lie in [{-len(self.layers_)}, {len(self.layers_) - 1}], got {layer}"
            )
        return layer % len(self.layers_)

    def _layer_outputs(self, X, upto: int):
        """Yield each layer's RFM outputs (n, c) for layers 0..upto, one layer at a time."""
        kernel = make_kernel(self.kernel, self.bandwidth, self.exponent)
        H, centres = self._new_inputs(X), self.X_fit_
        for index, fitted in enumerate(self.layers_[: upto + 1]):
            yield check_outputs(
                kernel.apply(H, centres, fitted.alpha, fitted.M, memory_gb=self.memory_gb)
            )
            if index < upto:
                H = self._rescale(fitted.forward(H), index + 1)
                centres = self._rescale(fitted.forward(centres), index + 1)

    def _last_outputs(self, X) -> torch.Tensor:
        check_is_fitted(self, "layers_")
        *_, outputs = self._layer_outputs(X, len(self.layers_) - 1)
        return outputs

    def decision_function(self, X) -> np.ndarray:
        """Outputs of the last layer's RFM: shape (n_samples, n_classes), or (n_samples,) for
        two classes (positive favours ``classes_[1]``), as scikit-learn's classifiers."""
        return decision_scores(self._last_outputs(X))

    def predict(self, X) -> np.ndarray:
        """Labels predicted by the last layer's RFM, shape (n_samples,)."""
        winners = self._last_outputs(X).argmax(dim=1).cpu().numpy()
        return self.classes_[winners]

    def predict_layers(self, X) -> np.ndarray:
        """Labels predicted by every layer's RFM, shape (n_layers, n_samples)."""
        check_is_fitted(self, "layers_")
        winners = [
            out.argmax(dim=1).cpu().numpy() for out in self._layer_outputs(X, len(self.layers_) - 1)
        ]
        return self.classes_[np.stack(winners)]

    # -- persistence ---------------------------------------------------------------------

    def save(self, path) -> None:
        """Save the fitted model: tensors plus a JSON configuration (no pickled code)."""
        check_is_fitted(self, "layers_")
        tensors = {"X_fit": self.X_fit_}
        for i, layer in enumerate(self.layers_):
            tensors |= {f"layer{i}.M": layer.M, f"layer{i}.alpha": layer.alpha}
            tensors |= {f"layer{i}.map.{k}": v for k, v in layer.feature_map.state_dict().items()}
        config = {
            "kind": "DeepRFM",
            "params": jsonable_params(self),
            "classes": self.classes_.tolist(),
            "feature_maps": [layer.feature_map.config() for layer in self.layers_],
            "histories": [layer.history.to_dict() for layer in self.layers_],
            "collapse": self.collapse_.to_dict(),
        }
        save_state(path, config, tensors)

    @classmethod
    def load(cls, path, device: str | torch.device | None = None) -> DeepRFM:
        """Load a model written by :meth:`save` (``torch.load(weights_only=True)``)."""
        config, tensors = load_state(path, "DeepRFM")
        with model_file_errors(path):
            params = restore_params(config["params"], device)
            if isinstance(params["normalize_rows"], bool):  # written before the option's names
                params["normalize_rows"] = "input" if params["normalize_rows"] else None
            model = cls(**params)
            model._check_params()
            model.classes_ = check_classes(config["classes"])
            maps = [_map_class(entry) for entry in config["feature_maps"]]
            if len(maps) != len(config["histories"]):
                raise ValueError("feature_maps and histories have different lengths")
            shapes = {"X_fit": ("n", "d0")}
            for i, map_class in enumerate(maps):
                shapes |= {f"layer{i}.M": (f"d{i}", f"d{i}"), f"layer{i}.alpha": ("n", "c")}
                shapes[f"layer{i}.map.weight"] = (f"d{i + 1}", f"d{i}")
                if map_class.has_bias(config["feature_maps"][i]):
                    shapes[f"layer{i}.map.bias"] = (f"d{i + 1}",)
            check_tensors(path, tensors, shapes, {"c": len(model.classes_)})
            device, dtype = resolve_device(model.device), resolve_dtype(model.dtype)
            model.X_fit_ = tensors["X_fit"].to(device=device, dtype=dtype)
            model.n_features_in_ = model.X_fit_.shape[1]
            model.layers_ = []
            for i, (map_config, history) in enumerate(
                zip(config["feature_maps"], config["histories"], strict=True)
            ):
                state = {
                    k.removeprefix(f"layer{i}.map."): v.to(device=device, dtype=dtype)
                    for k, v in tensors.items()
                    if k.startswith(f"layer{i}.map.")
                }
                M = tensors[f"layer{i}.M"].to(device=device, dtype=dtype)
                model.layers_.append(
                    DeepRFMLayer(
                        M,
                        psd_power(M, 0.5),
                        RandomFeatureMap.from_state_dict(map_config, state),
                        tensors[f"layer{i}.alpha"].to(device=device, dtype=dtype),
                        xr.Dataset.from_dict(history),
                    )
                )
            model.collapse_ = xr.Dataset.from_dict(config["collapse"])
        return model


def _map_class(config: dict) -> type[RandomFeatureMap]:
    """The feature-map class a saved map configuration names."""
    if not isinstance(config, dict) or config.get("name") not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {config!r}; known: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[config["name"]]
