"""Labelled records: per-iteration, per-epoch and per-layer numbers as xarray datasets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

__all__ = ["labelled_record"]


def labelled_record(
    columns: Mapping[str, Sequence[float]],
    dim: str,
    coord: Sequence,
    meanings: Mapping[str, tuple[str, str]],
) -> xr.Dataset:
    """One variable per column along ``dim``, each with attrs ``long_name`` and ``definition``.

    Parameters
    ----------
    columns : mapping of str to sequence of float
        The values of each variable, one per position along ``dim``.
    dim : str
        The dimension (``"iteration"``, ``"epoch"``, ``"layer"``).
    coord : sequence
        Its coordinate values.
    meanings : mapping of str to (long_name, definition)
        The attrs of every variable in ``columns``.
    """
    return xr.Dataset(
        {
            name: (
                dim,
                np.asarray(values),
                {"long_name": meanings[name][0], "definition": meanings[name][1]},
            )
            for name, values in columns.items()
        },
        coords={dim: np.asarray(coord)},
    )
