"""Deep RFM: layers of RFM → AGOP projection → random features, with collapse per layer.

Layer l takes features X_l (the inputs for l = 0, else the previous layer's random
features; by default rows scaled to unit norm on entering every layer, as in the paper's code),
fits a clone of the layer estimator (an RFM) on (X_l, y) through its public ``fit``, takes its
learned metric M_l (the normalised AGOP), projects
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
from typing import ClassVar

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone, is_classifier
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from analysis import collapse_metrics
from deeprfm._classes import check_classes, decision_scores, encode_labels, known_labels
from deeprfm._diagnostics import check_outputs
from deeprfm._memory import Compute, check_fits, check_memory_gb, resolve_device, resolve_dtype
from deeprfm._records import labelled_record
from deeprfm._validation import (
    Constraint,
    Flag,
    Number,
    OneOf,
    Rule,
    check_number,
    check_params,
    estimator_inputs,
    eval_set_inputs,
)
from deeprfm.agop import psd_power
from deeprfm.deep_layer import STAGES, DeepRFMLayer, unit_rows
from deeprfm.features import FEATURE_MAPS, RandomFeatureMap
from deeprfm.kernels import make_kernel
from deeprfm.persist import (
    check_tensors,
    jsonable_params,
    load_state,
    model_file_errors,
    params_json,
    restore_params,
    save_state,
)
from deeprfm.rfm import RFMClassifier, metric_bytes

__all__ = ["DeepRFM", "DeepRFMLayer", "unit_rows"]

logger = logging.getLogger("deeprfm")

#: Settings of the whole model that DeepRFM sets on every layer's clone.
_SHARED_SETTINGS = ("device", "dtype", "memory_gb")
#: Layer estimators a saved DeepRFM may name.
_LAYER_ESTIMATORS = {"RFMClassifier": RFMClassifier}
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


def _check_layer_estimator(layer) -> None:
    """Raise TypeError unless ``layer`` is None or an RFM classifier DeepRFM can compose."""
    if layer is None:
        return
    if not (isinstance(layer, BaseEstimator) and is_classifier(layer)):
        raise TypeError(f"layer must be a classifier such as RFMClassifier, got {layer!r}")
    missing = {"copy_X", "random_state", *_SHARED_SETTINGS} - set(layer.get_params())
    if missing:
        raise TypeError(
            f"layer must be an RFM classifier with the parameters {sorted(missing)} "
            f"(such as RFMClassifier), got {type(layer).__name__}"
        )


class DeepRFM(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Deep Recursive Feature Machine classifier: a meta-estimator over a layer estimator.

    Every layer fits a clone of ``layer`` (an RFM) on the features entering it, projects them
    with the square root of its learned metric and maps them with random features.

    Parameters
    ----------
    layer : RFMClassifier, optional
        The estimator fitted in every layer, cloned per layer (default
        ``RFMClassifier(iters=1)``, the paper's one AGOP iteration). Its parameters are
        reachable as ``layer__bandwidth``, ``layer__reg``, ``layer__targets`` (``"pm1"``: the
        paper's ±1 codes), ... in ``get_params``/``set_params`` and grid searches. DeepRFM
        sets ``random_state`` (one seed per layer, from DeepRFM's) and ``copy_X=False`` on
        each clone, and its own ``device``, ``dtype`` and ``memory_gb``; a layer whose own
        values of these three differ from their defaults and from DeepRFM's is refused.
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
    normalize_rows : {"every_layer", "input", None}
        Scale every row to unit Euclidean norm on entering every layer (the paper's code),
        only before the first layer, or never.
    device : str or torch.device, optional
        Computation device of every layer; default CUDA when available, else CPU.
    dtype : torch.float32 or torch.float64
    memory_gb : float, optional
        Memory budget in GiB (docs/design.md, *The memory-budget contract*), resolved once per
        ``fit`` and given to every layer.
    random_state : int, optional
        Seeds the random feature maps and every layer's estimator.
    verbose : bool
        Progress bar over layers.

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

    _constraints: ClassVar[dict[str, Constraint]] = {
        "layer": Rule(_check_layer_estimator),
        "layers": Number(integer=True, low=1),
        "width": Number(integer=True, low=1, optional=True),
        "feature_map": OneOf(tuple(FEATURE_MAPS)),
        "normalize_rows": OneOf(ROW_NORMALIZATIONS),
        "device": Rule(resolve_device),
        "dtype": Rule(resolve_dtype),
        "memory_gb": Rule(check_memory_gb),
        "verbose": Flag(),
    }

    def __init__(
        self,
        layer: RFMClassifier | None = None,
        layers: int = 5,
        width: int | None = 1024,
        feature_map: str = "relu",
        feature_params: dict | None = None,
        normalize_rows: str | None = "every_layer",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        memory_gb: float | None = None,
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.layer = layer
        self.layers = layers
        self.width = width
        self.feature_map = feature_map
        self.feature_params = feature_params
        self.normalize_rows = normalize_rows
        self.device = device
        self.dtype = dtype
        self.memory_gb = memory_gb
        self.random_state = random_state
        self.verbose = verbose

    # -- fitting -------------------------------------------------------------------------

    def _check_params(self) -> BaseEstimator:
        """Check the parameters; the layer estimator (a fresh default when ``layer`` is None)."""
        check_params(self, self._constraints)
        self._feature_map(1)  # validates feature_params
        layer = RFMClassifier(iters=1) if self.layer is None else self.layer
        defaults, given = type(layer)().get_params(), layer.get_params()
        for name in _SHARED_SETTINGS:
            value, default = _setting(name, given[name]), _setting(name, defaults[name])
            if value != default and value != _setting(name, getattr(self, name)):
                raise ValueError(
                    f"layer__{name}={given[name]!r} differs from DeepRFM's {name}="
                    f"{getattr(self, name)!r}; DeepRFM sets device, dtype and memory_gb on "
                    "every layer: give them to DeepRFM"
                )
        return layer

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
        template = self._check_params()
        compute = Compute.resolve(self.device, self.dtype, self.memory_gb)
        # X_fit_ is the model's own: a copy, or the new tensor of the row normalisation
        X, y = estimator_inputs(
            self,
            X,
            y,
            device=compute.device,
            dtype=compute.dtype,
            reset=True,
            copy=self.normalize_rows is None,
        )
        self.classes_, labels = encode_labels(y)
        H = self._rescale(X, 0)
        evaluation = None
        if eval_set is not None:
            X_val, y_val = eval_set_inputs(
                eval_set, self.n_features_in_, compute.device, compute.dtype
            )
            evaluation = (self._rescale(X_val, 0), y_val, known_labels(y_val, self.classes_))
        self._check_memory(H, compute)
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(2**31 - 1)))
        self.X_fit_ = H
        self.layers_, records = [], []
        for index in tqdm(range(self.layers), desc="Deep RFM", disable=not self.verbose):
            estimator = clone(template).set_params(
                random_state=int(rng.randint(2**31 - 1)),
                copy_X=False,  # H is DeepRFM's own tensor: no second copy of the features
                device=compute.device,
                dtype=compute.dtype,
                memory_gb=compute.memory_gb,
            )
            record, H, evaluation = self._fit_layer(
                estimator, H, (y, labels), evaluation, generator
            )
            records.append(record)
            logger.info("Deep RFM layer %d: train acc %.4f", index, record["train_acc"])
        self.collapse_ = self._collapse_dataset(records)
        return self

    def _check_memory(self, H: torch.Tensor, compute: Compute) -> None:
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
            compute.budget,
            compute.device,
            f"DeepRFM(width={width}) on {n} points (a layer's features, random weights and "
            "the next layer's d x d metric)",
            "use a smaller width or a larger memory_gb",
        )

    def _fit_layer(self, estimator, H, targets, evaluation, generator):
        """Fit one layer's ``estimator`` on the features H (n, d_l) entering it.

        ``targets`` holds the labels and their class indices; ``evaluation`` the eval_set's
        features entering the layer, labels and class indices (or None). Returns the layer's
        record, the training features entering the next layer and the next ``evaluation``.
        """
        start = time.perf_counter()
        index = len(self.layers_)
        y, labels = targets
        estimator.fit(H, y)
        fitted = time.perf_counter()
        feature_map = self._feature_map(H.shape[1])
        feature_map.fit(H.shape[1], generator=generator, device=H.device, dtype=H.dtype)
        M = torch.as_tensor(estimator.M_, dtype=H.dtype, device=H.device)
        layer = DeepRFMLayer(
            M,
            psd_power(M, 0.5),
            feature_map,
            torch.as_tensor(estimator.alpha_, dtype=H.dtype, device=H.device),
            estimator.kernel_,
            estimator.history_,
        )
        self.layers_.append(layer)
        stages = layer.stages(H)
        mapped = time.perf_counter()
        record = {
            "train_acc": float(estimator.history_["train_acc"][estimator.best_iter_]),
            "train": {name: collapse_metrics(f, labels) for name, f in stages.items()},
        }
        if evaluation is not None:
            H_val, y_val, labels_val = evaluation
            record["eval_acc"] = float(estimator.score(H_val, y_val))
            val_stages = layer.stages(H_val)
            record["eval"] = {
                name: collapse_metrics(f, labels_val) for name, f in val_stages.items()
            }
            evaluation = (self._rescale(val_stages["features"], index + 1), y_val, labels_val)
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

    def _new_inputs(self, X) -> torch.Tensor:
        """New inputs (an array or a tensor) as they enter layer 0, on the fitted device."""
        check_is_fitted(self, "layers_")
        X, _ = estimator_inputs(
            self, X, device=self.X_fit_.device, dtype=self.X_fit_.dtype, reset=False
        )
        return self._rescale(X, 0)

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
        H, centres = self._new_inputs(X), self.X_fit_
        for index, fitted in enumerate(self.layers_[: upto + 1]):
            yield check_outputs(
                fitted.kernel.apply(H, centres, fitted.alpha, fitted.M, memory_gb=self.memory_gb)
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
            params = restore_params(_upgrade_params(config["params"]), device, _LAYER_ESTIMATORS)
            model = cls(**params)
            template = model._check_params()
            kernel = make_kernel(template.kernel, template.bandwidth, template.exponent)
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
                        kernel,
                        xr.Dataset.from_dict(history),
                    )
                )
            model.collapse_ = xr.Dataset.from_dict(config["collapse"])
        return model


#: RFM options a DeepRFM file written before ``layer`` existed holds among its own parameters.
_OLD_LAYER_OPTIONS = (
    "kernel",
    "bandwidth",
    "reg",
    "solver",
    "targets",
    "exponent",
    "diag",
    "centering",
    "agop_power",
    "agop_samples",
    "normalize",
)


def _upgrade_params(params: dict) -> dict:
    """Saved parameters in today's form: files written before DeepRFM composed a layer
    estimator hold the RFM options (``rfm_iters`` for ``iters``) among their own, and files
    older still a boolean ``normalize_rows``."""
    params = dict(params)
    if isinstance(params.get("normalize_rows"), bool):
        params["normalize_rows"] = "input" if params["normalize_rows"] else None
    if "layer" not in params:
        options = {name: params.pop(name) for name in _OLD_LAYER_OPTIONS if name in params}
        options["iters"] = params.pop("rfm_iters", 1)
        params["layer"] = {"estimator": "RFMClassifier", "params": options}
    return params


def _setting(name: str, value):
    """A device, dtype or budget in one form, for comparing a layer's with DeepRFM's."""
    if value is None:
        return None
    if name == "dtype":
        return resolve_dtype(value)
    return torch.device(value) if name == "device" else value


def _map_class(config: dict) -> type[RandomFeatureMap]:
    """The feature-map class a saved map configuration names."""
    if not isinstance(config, dict) or config.get("name") not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {config!r}; known: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[config["name"]]
