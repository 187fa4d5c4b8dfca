"""Random feature maps: drawn once for an input dimension, then applied to any data.

Both maps are reproducible from a seed and can be saved as a dict of tensors
(``state_dict``) and rebuilt from it (``from_state_dict``).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch

from deeprfm._validation import check_bool, check_number

__all__ = ["FEATURE_MAPS", "LaplaceRandomFeatures", "RandomFeatureMap", "ReLURandomFeatures"]


class RandomFeatureMap(ABC):
    """A random map from R^d to R^k, with its random draws held in tensors.

    Parameters
    ----------
    width : int
        Output dimension k ≥ 1.
    """

    name: str = ""

    def __init__(self, width: int = 1024) -> None:
        check_number(width, "width", integer=True, low=1)
        self.width = int(width)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(
        self,
        n_features: int,
        *,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> RandomFeatureMap:
        """Draw the map for inputs of ``n_features`` dimensions.

        Parameters
        ----------
        n_features : int
            Input dimension d.
        generator : torch.Generator
            CPU generator of the draws (seeded by the caller for reproducibility).
        device, dtype
            Where and in which precision the map is applied.
        """
        weight, bias = self._draw(n_features, generator)
        self.weight = weight.to(device=device, dtype=dtype)
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)
        return self

    @abstractmethod
    def _draw(
        self, n_features: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (k, d) and optional bias (k,), drawn in float64 on the CPU."""

    @abstractmethod
    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The nonlinearity applied to X Wᵀ + b."""

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Apply the map.

        Parameters
        ----------
        X : torch.Tensor, shape (n, d)

        Returns
        -------
        torch.Tensor, shape (n, width)
        """
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__} must be fitted before transform")
        if X.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features, but the feature map expects {self.weight.shape[1]}"
            )
        if self.bias is None:
            return self._activate(X @ self.weight.T)
        return self._activate(torch.addmm(self.bias, X, self.weight.T))

    @classmethod
    def parameters(cls) -> list[str]:
        """Names of the constructor's keyword arguments besides ``width``."""
        signature = inspect.signature(cls.__init__)
        return [name for name in signature.parameters if name not in ("self", "width")]

    def config(self) -> dict:
        """Constructor arguments, JSON-serialisable."""
        return {"name": self.name, "width": self.width}

    @classmethod
    def has_bias(cls, config: dict) -> bool:
        """Whether a map with this :meth:`config` has a bias in its :meth:`state_dict`."""
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random draws."""
        state = {"weight": self.weight}
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    @classmethod
    def from_state_dict(cls, config: dict, state: dict[str, torch.Tensor]) -> RandomFeatureMap:
        """Rebuild a fitted map from :meth:`config` and :meth:`state_dict`."""
        options = {k: v for k, v in config.items() if k != "name"}
        feature_map = FEATURE_MAPS[config["name"]](**options)
        feature_map.weight = state["weight"]
        feature_map.bias = state.get("bias")
        return feature_map


class ReLURandomFeatures(RandomFeatureMap):
    """ReLU random features ReLU(X Wᵀ + b), W_ij ~ N(0, 1/d).

    Parameters
    ----------
    width : int
        Number of features k.
    bias : bool
        Add a bias b_i ~ N(0, 1/d).
    init : {"gaussian", "torch"}
        ``"gaussian"``: N(0, 1/d) entries; ``"torch"``: the default ``torch.nn.Linear``
        initialisation, U(−1/√d, 1/√d).
    """

    name = "relu"

    def __init__(self, width: int = 1024, bias: bool = False, init: str = "gaussian") -> None:
        super().__init__(width)
        check_bool(bias, "bias")
        if init not in ("gaussian", "torch"):
            raise ValueError(f"init must be 'gaussian' or 'torch', got {init!r}")
        self.use_bias = bool(bias)
        self.init = init

    def config(self) -> dict:
        return super().config() | {"bias": self.use_bias, "init": self.init}

    @classmethod
    def has_bias(cls, config: dict) -> bool:
        return bool(config["bias"])

    def _draw(self, n_features, generator):
        shape = (self.width, n_features + 1)
        if self.init == "gaussian":
            draws = torch.randn(shape, generator=generator, dtype=torch.float64)
            draws /= math.sqrt(n_features)
        else:
            draws = torch.rand(shape, generator=generator, dtype=torch.float64)
            draws = (2 * draws - 1) / math.sqrt(n_features)
        return draws[:, :-1], draws[:, -1] if self.use_bias else None

    def _activate(self, pre):
        return torch.relu(pre)


class LaplaceRandomFeatures(RandomFeatureMap):
    """Random Fourier features of the Laplace kernel exp(−γ‖x − z‖₁).

    φ(x) = √(2/k) cos(X Wᵀ + b), with W_ij ~ Cauchy(0, γ) and b_i ~ U[0, 2π), so that
    E[φ(x)·φ(z)] = exp(−γ‖x − z‖₁).

    Parameters
    ----------
    width : int
        Number of features k.
    scale : float
        γ > 0, the inverse length scale of the kernel.
    """

    name = "laplace_rff"

    def __init__(self, width: int = 1024, scale: float = 1.0) -> None:
        super().__init__(width)
        check_number(scale, "scale", low=0, low_inclusive=False)
        self.scale = float(scale)

    def config(self) -> dict:
        return super().config() | {"scale": self.scale}

    def _draw(self, n_features, generator):
        uniform = torch.rand(self.width, n_features, generator=generator, dtype=torch.float64)
        weight = self.scale * torch.tan(math.pi * (uniform - 0.5))
        bias = 2 * math.pi * torch.rand(self.width, generator=generator, dtype=torch.float64)
        return weight, bias

    def _activate(self, pre):
        return math.sqrt(2.0 / self.width) * torch.cos(pre)


FEATURE_MAPS: dict[str, type[RandomFeatureMap]] = {
    ReLURandomFeatures.name: ReLURandomFeatures,
    LaplaceRandomFeatures.name: LaplaceRandomFeatures,
}
