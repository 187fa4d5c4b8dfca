"""Why a fitted RFM went degenerate: a constant predictor, or a metric that is not finite.

An RFM whose AGOP is zero has a constant predictor (its gradient vanishes everywhere it is
measured), and the next metric M = 0 keeps it constant. This is almost always a
hyper-parameter out of range; :func:`next_metric` names the likely one in its warning.
"""

from __future__ import annotations

import warnings

import torch

from analysis._common import user_stacklevel
from deeprfm.agop import normalize_matrix, psd_power
from deeprfm.kernels import Kernel, sq_distances

__all__ = ["check_coefficients", "check_outputs", "next_metric"]

#: Training points whose distances estimate the typical distance (the median of a sample).
_DISTANCE_SAMPLE = 256
#: A bandwidth this many times below or above the median distance makes the kernel degenerate.
_BANDWIDTH_RANGE = 1e3


def next_metric(
    agop: torch.Tensor,
    power: float,
    normalize: str | None,
    *,
    kernel: Kernel,
    X: torch.Tensor,
    M: torch.Tensor,
    fitted: torch.Tensor,
    reg: float,
) -> torch.Tensor:
    """The next RFM metric, normalize(AGOP^power), refusing or flagging degenerate ones.

    Parameters
    ----------
    agop : torch.Tensor, shape (d, d)
        AGOP of the fitted predictor (kernel, centres X, metric M, outputs ``fitted`` at X).
    power, normalize
        ``agop_power`` and ``normalize`` of the estimator.
    kernel, X, M, fitted, reg
        The fit the AGOP belongs to, used to name the likely cause.

    Raises
    ------
    ValueError
        AGOP^power is not finite (an ``agop_power`` too large for the AGOP's scale).

    Warns
    -----
    RuntimeWarning
        The AGOP (or its power) is zero: the fitted predictor is constant; the message names
        the parameter that is likely the cause.
    """
    # AGOP^1 is the AGOP unless rounding (float32 products M · S · M) left it indefinite, which
    # would make kernel matrices indefinite too: its eigenvalues (eigvalsh, a third of an eigh)
    # decide whether it needs the clamp of psd_power
    if power == 1 and float(torch.linalg.eigvalsh(agop.double())[0]) >= 0:
        powered = agop
    else:
        powered = psd_power(agop, power)
    if not bool(torch.isfinite(powered).all()):
        raise ValueError(
            f"agop_power={power:g}: AGOP^{power:g} is not finite (the AGOP's largest eigenvalue "
            f"is {float(torch.linalg.eigvalsh(agop.double())[-1]):.3g}); use a smaller "
            "agop_power"
        )
    if bool(torch.any(powered)):
        return normalize_matrix(powered, normalize)
    if bool(torch.any(agop)):
        cause = f"agop_power={power:g} makes every eigenvalue of AGOP^p underflow to 0"
    else:
        cause = _constant_cause(kernel, X, M, fitted, reg)
    warnings.warn(
        f"the fitted predictor is constant (its AGOP is zero), so the learned metric M is 0 "
        f"and every later iteration stays constant; likely cause: {cause}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
    return powered


def _constant_cause(
    kernel: Kernel, X: torch.Tensor, M: torch.Tensor, fitted: torch.Tensor, reg: float
) -> str:
    """The hyper-parameter that most likely made the predictor constant."""
    if float(fitted.abs().max()) == 0.0 or float(fitted.std(dim=0).max()) <= 1e-6:
        if reg > 1:
            return f"reg={reg:g} is so large that the coefficients vanish"
    sample = X[:_DISTANCE_SAMPLE]
    distances = sq_distances(sample, sample, M).sqrt()
    off_diagonal = distances[~torch.eye(len(sample), dtype=torch.bool, device=X.device)]
    typical = float(off_diagonal.median()) if off_diagonal.numel() else 0.0
    bandwidth = kernel.bandwidth
    if typical == 0.0:
        return "the training points coincide under the metric M"
    if bandwidth < typical / _BANDWIDTH_RANGE:
        return (
            f"bandwidth={bandwidth:g} is tiny next to the median distance {typical:.3g} between "
            "training points: the kernel vanishes between distinct points"
        )
    if bandwidth > typical * _BANDWIDTH_RANGE:
        return (
            f"bandwidth={bandwidth:g} is huge next to the median distance {typical:.3g} between "
            "training points: the kernel is constant"
        )
    return f"reg={reg:g} or the targets: the predictor's outputs do not vary"


def check_coefficients(alpha: torch.Tensor, reg: float) -> None:
    """Raise ValueError when a solve returned non-finite coefficients α."""
    if not bool(torch.isfinite(alpha).all()):
        raise ValueError(
            f"the kernel solve returned non-finite coefficients (reg={reg:g}); the kernel "
            "matrix or the targets are not finite: check the inputs' scale and the metric"
        )


def check_outputs(outputs: torch.Tensor) -> torch.Tensor:
    """``outputs`` (m, c) of a predictor, or ValueError if any is NaN or infinite."""
    if not bool(torch.isfinite(outputs).all()):
        raise ValueError(
            "the predictions are not finite: the model's coefficients or metric hold NaN or "
            "infinite values (a damaged model file?) or the inputs overflow its dtype"
        )
    return outputs
