"""Small helpers shared by the analysis modules."""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

Array: TypeAlias = np.ndarray | torch.Tensor

#: The packages of the deeprfm distribution: their frames are the library's, not the user's.
LIBRARY_PACKAGES = frozenset({"analysis", "deeprfm"})


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that points at the user's line.

    The level of the first calling frame whose module is not in :data:`LIBRARY_PACKAGES`, so a
    warning raised anywhere inside the library, however deep, names the user's call.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.partition(".")[0] not in LIBRARY_PACKAGES:
            break
        frame, level = frame.f_back, level + 1
    return level


def named_items(items: Any, what: str) -> tuple[list[Hashable], list[Any]]:
    """Split a mapping (ordered names) or a sequence (names ``0 .. L-1``) into names and values.

    Raises
    ------
    TypeError
        If ``items`` is neither a mapping nor a sequence.
    ValueError
        If it is empty; ``what`` names the argument in the message.
    """
    if isinstance(items, Mapping):
        names, values = list(items.keys()), list(items.values())
    elif isinstance(items, Sequence) and not isinstance(items, str):
        names, values = list(range(len(items))), list(items)
    else:
        raise TypeError(
            f"{what}: expected a mapping name -> value or a sequence, got {type(items).__name__}"
        )
    if not values:
        raise ValueError(f"{what}: expected at least one entry, got none")
    return names, values


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported when a plot is drawn (the ``plot`` extra)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'deeprfm[plot]'") from err
    return plt
