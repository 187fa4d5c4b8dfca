"""One fitted layer of a Deep RFM and the row normalisation between layers.

A layer holds its RFM's predictor (metric M, coefficients α, kernel) and its random feature map;
it projects the features entering it, X̃ = X M^{1/2}, and maps them, φ(X̃) (docs/design.md,
*Deep RFM*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xarray as xr

from deeprfm.features import RandomFeatureMap
from deeprfm.kernels import Kernel

__all__ = ["STAGES", "DeepRFMLayer", "unit_rows"]

STAGES = ("input", "projected", "features")


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
    kernel : Kernel
        Kernel of the layer's RFM.
    history : xarray.Dataset
        The layer RFM's per-iteration history.
    """

    M: torch.Tensor
    M_sqrt: torch.Tensor
    feature_map: RandomFeatureMap
    alpha: torch.Tensor
    kernel: Kernel
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
