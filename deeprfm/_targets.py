"""What a regressor and a classifier of regression outputs do differently, as two mixins.

An estimator built on them defines ``_outputs(X)`` (its outputs (n, k) at new points, a
tensor); the mixins encode the training and ``eval_set`` targets, score outputs against them
(the MSE, and the accuracy for a classifier), define ``predict`` (and ``decision_function``),
and describe the targets for a model file. Used by the RFM and HyperBF estimators.
"""

from __future__ import annotations

import numpy as np
import torch

from deeprfm._classes import (
    check_classes,
    check_targets,
    class_codes,
    decision_scores,
    encode_labels,
    known_labels,
)

__all__ = ["SCORE_ATTRS", "ClassCodeTargets", "RealTargets"]

#: ``long_name`` and ``definition`` of the scores ``_scores`` records in a history.
SCORE_ATTRS = {
    "train_acc": (
        "training accuracy",
        "fraction of training points whose argmax output is the label",
    ),
    "eval_acc": (
        "eval_set accuracy",
        "fraction of eval_set points whose argmax output is the label",
    ),
    "train_mse": ("training mean squared error", "mean over points and outputs of (f(x) - y)^2"),
    "eval_mse": (
        "eval_set mean squared error",
        "mean over eval_set points and outputs of (f(x) - y)^2",
    ),
}


class _RegressionOutputs:
    """Outputs (m, k) regressed on encoded targets (m, k)."""

    def _scores(self, predicted: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict:
        """``{prefix}_mse``: the mean over points and outputs of the squared error."""
        return {f"{prefix}_mse": float(((predicted - targets) ** 2).mean())}


class RealTargets(_RegressionOutputs):
    """Real targets, one output (y of shape (n,)) or several (n, k); ``predict`` returns them
    in the shape of the training ``y``."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _encode_targets(self, y: np.ndarray) -> np.ndarray:
        """Training targets as (n, k) floats; remembers whether ``y`` had one output."""
        self._single_output = y.ndim == 1
        return self._encode_eval_targets(y)

    def _encode_eval_targets(self, y: np.ndarray) -> np.ndarray:
        targets = np.asarray(y, dtype=np.float64)
        return targets[:, None] if targets.ndim == 1 else targets

    def predict(self, X) -> np.ndarray:
        """Predicted targets, shape (n_samples,) or (n_samples, n_outputs)."""
        predicted = self._outputs(X).cpu().numpy().astype(np.float64)
        return predicted[:, 0] if self._single_output else predicted

    def _target_config(self) -> dict:
        """The targets as a model file records them."""
        return {"single_output": self._single_output}

    def _set_target_config(self, config: dict) -> None:
        if not isinstance(config["single_output"], bool):
            raise TypeError(
                f"targets single_output must be a bool, got {config['single_output']!r}"
            )
        self._single_output = config["single_output"]

    def _target_sizes(self) -> dict[str, int]:
        """Sizes the model file's tensors must have (``c``: the outputs)."""
        return {"c": 1} if self._single_output else {}


class ClassCodeTargets(_RegressionOutputs):
    """Labels of any type, regressed as the ``targets`` codes of their classes (one-hot or
    ±1); the prediction is the class of the largest output."""

    def _encode_targets(self, y: np.ndarray) -> np.ndarray:
        """Class codes (n, K) of training labels; sets ``classes_``."""
        check_targets(self.targets)
        self.classes_, indices = encode_labels(y)
        return class_codes(indices, len(self.classes_), self.targets)

    def _encode_eval_targets(self, y: np.ndarray) -> np.ndarray:
        return class_codes(known_labels(y, self.classes_), len(self.classes_), self.targets)

    def _scores(self, predicted: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict:
        """The base scores and the accuracy ``{prefix}_acc`` of the argmax."""
        accuracy = (predicted.argmax(dim=1) == targets.argmax(dim=1)).double().mean()
        return {f"{prefix}_acc": float(accuracy)} | super()._scores(predicted, targets, prefix)

    def decision_function(self, X) -> np.ndarray:
        """Outputs: shape (n_samples, n_classes), or (n_samples,) for two classes (positive
        favours ``classes_[1]``)."""
        return decision_scores(self._outputs(X))

    def predict(self, X) -> np.ndarray:
        """Predicted labels, shape (n_samples,)."""
        winners = self._outputs(X).argmax(dim=1).cpu().numpy()
        return self.classes_[winners]

    def _target_config(self) -> dict:
        """The targets as a model file records them."""
        return {"classes": self.classes_.tolist()}

    def _set_target_config(self, config: dict) -> None:
        self.classes_ = check_classes(config["classes"])

    def _target_sizes(self) -> dict[str, int]:
        """Sizes the model file's tensors must have (``c``: the classes)."""
        return {"c": len(self.classes_)}
