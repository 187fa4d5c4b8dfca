"""The data a probe passes over: batches from a DataLoader, an iterable or a pair (X, y).

Every pass is recorded (sample count, labels, an order-free checksum) so that the collapse
passes can check they saw the samples the first pass saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["PAIR_BATCH_SIZE", "PassRecord", "Source", "convert_batch", "different_samples_error"]

#: Rows per batch when ``measure`` is given a pair of tensors.
PAIR_BATCH_SIZE = 64


@dataclass
class PassRecord:
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

    def same_samples(self, other: PassRecord) -> bool:
        return (
            self.n == other.n
            and torch.equal(self.all_labels().sort().values, other.all_labels().sort().values)
            and bool(torch.allclose(self.moments, other.moments, rtol=1e-9, atol=1e-9))
        )


class Source:
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


def convert_batch(
    raw: Any, device: torch.device, dtype: torch.dtype, need_labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch ``(x, y, ...)`` or ``x`` as tensors on ``device``: copied inputs (floating ones
    cast to ``dtype`` and checked finite) and int64 labels (or None, unless ``need_labels``)."""
    if isinstance(raw, (tuple, list)):
        if not raw:
            raise ValueError("data: got an empty batch; expected (x, y)")
        x, y = raw[0], (raw[1] if len(raw) > 1 else None)
    else:
        x, y = raw, None
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"data: expected batches (x, y) of tensors or arrays, got x of type {type(x).__name__}"
        )
    x = torch.as_tensor(x)
    if x.ndim == 0:
        raise ValueError("data: inputs must have a batch dimension, got a scalar")
    if x.is_floating_point():
        x = x.to(device=device, dtype=dtype, copy=True)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data: inputs contain NaN or infinite values")
    else:
        x = x.to(device=device, copy=True)
    if y is None:
        if need_labels:
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
    return x, y.to(device=device, dtype=torch.int64)


def different_samples_error() -> ValueError:
    """The error of passes over the data that saw different samples."""
    return ValueError(
        "data: the passes over data yielded different samples (shuffling with "
        "max_samples, or random augmentation?); the collapse metrics need the same samples "
        "on every pass: iterate in a fixed order with deterministic transforms, or use "
        "collapse=False"
    )
