"""analysis: neural-collapse metrics, Neural Feature Ansatz correlations and collapse curves.

Depends on numpy, torch and xarray only (matplotlib is imported when a plot is drawn) and never
imports :mod:`deeprfm`.
"""

from analysis.collapse import (
    METRICS,
    CollapseAccumulator,
    collapse_curves,
    collapse_metrics,
    stack_curves,
)
from analysis.nfa import nfa_correlation, nfa_correlations, psd_power
from analysis.plots import plot_collapse, plot_matrix

__all__ = [
    "METRICS",
    "CollapseAccumulator",
    "collapse_curves",
    "collapse_metrics",
    "nfa_correlation",
    "nfa_correlations",
    "plot_collapse",
    "plot_matrix",
    "psd_power",
    "stack_curves",
]
