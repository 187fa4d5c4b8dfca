"""The result of a probe: per-layer matrices, NFA correlations and collapse metrics as a DataTree.

The root dataset holds one value per layer (``nfa_*``) and per layer and stage (the collapse
metrics); one group per layer, ``layers/<name>``, holds its NFM and AGOP (d × d, or their
diagonals in diagonal form).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from analysis import METRICS, nfa_correlations
from deeprfm._memory import rows_per_block
from deeprfm.probes.batches import PassRecord
from deeprfm.probes.gradients import GradientSum
from deeprfm.probes.layers import ProbedLayer
from deeprfm.probes.settings import ProbeSettings

__all__ = ["Result", "collapse_variables"]

NFA_REFERENCE = (
    "Radhakrishnan, Beaglehole, Pandit & Belkin (2024), Mechanism for feature learning in "
    "neural networks and backpropagation-free machine learning models, Science 383:1461-1467, "
    "arXiv:2212.13881; convolutions: Beaglehole, Radhakrishnan, Pandit & Belkin (2023), "
    "Mechanism of feature learning in convolutional neural networks, arXiv:2309.00570"
)
AGOP_DEFINITION = (
    "(1/n) sum_x sum_c sum_p grad_p f_c(x) grad_p f_c(x)^T, the gradient of the model output "
    "f_c with respect to the layer input at position p (Conv2d: the C_in*kh*kw patch; Linear: "
    "the d_in vector) through this layer, summed over positions and outputs (or random "
    "projections of the outputs) and averaged over the n samples; computed as W^T G W"
)
# Root variables: name -> (Pearson or cosine, power of the AGOP, long_name).
NFA_VARIABLES = {
    "nfa_corr": ("pearson", 0.5, "NFA correlation (Pearson) of NFM and AGOP^1/2"),
    "nfa_corr_agop1": ("pearson", 1.0, "NFA correlation (Pearson) of NFM and AGOP"),
    "nfa_cosine": ("cosine", 0.5, "NFA cosine similarity of NFM and AGOP^1/2"),
}


class Result:
    """Builds a measurement's DataTree from its sums and collapse results.

    Parameters
    ----------
    settings : ProbeSettings
    layers : sequence of ProbedLayer
        The layers that ran, in the order of the result.
    forms : dict of str to {"full", "diagonal"}
    budget : int
        Memory budget in bytes (for the blocked NFM diagonal).
    """

    def __init__(
        self,
        settings: ProbeSettings,
        layers: Sequence[ProbedLayer],
        forms: dict[str, str],
        budget: int,
    ) -> None:
        self.settings, self.layers, self.forms, self.budget = settings, list(layers), forms, budget

    def matrices(
        self, sums: dict[str, GradientSum], record: PassRecord | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: ``nfm`` and ``agop``, (d, d) float64 or their diagonals (d,)."""
        result: dict[str, dict[str, torch.Tensor]] = {}
        for layer in self.layers:
            entry = {}
            if self.settings.nfm:
                entry["nfm"] = self.nfm(layer.matrix(), self.forms[layer.name] == "diagonal")
            if self.settings.agop:
                entry["agop"] = sums[layer.name].finish(record.n)
            result[layer.name] = entry
        return result

    def nfm(self, w: torch.Tensor, diagonal: bool) -> torch.Tensor:
        """WᵀW (d, d) in float64, or its diagonal (d,) from row blocks of W (no float64 copy)."""
        if not diagonal:
            w = w.to(torch.float64)
            return w.T @ w
        k, d = w.shape
        step = rows_per_block(self.budget, 2 * d * 8, k)
        return sum((w[i : i + step].to(torch.float64) ** 2).sum(dim=0) for i in range(0, k, step))

    def assemble(
        self,
        matrices: dict[str, dict[str, torch.Tensor]],
        nfa: dict[str, Any],
        collapse: dict[tuple[str, str], xr.Dataset | None],
        record: PassRecord | None,
        positions: dict[str, int],
        timings: dict[str, float],
    ) -> xr.DataTree:
        """The DataTree: root variables along ``layer`` (and ``stage``), a group per layer."""
        settings, names = self.settings, [layer.name for layer in self.layers]
        data_vars: dict[str, Any] = dict(nfa)
        coords: dict[str, Any] = {
            "layer": names,
            "layer_type": ("layer", [layer.kind for layer in self.layers]),
            "fan_in": ("layer", [layer.shape[1] for layer in self.layers]),
            "matrix_form": ("layer", [self.forms[name] for name in names]),
        }
        if settings.collapse:
            data_vars.update(collapse_variables(names, settings.stages, collapse))
            coords["stage"] = list(settings.stages)
        if "output" in settings.stages:
            coords["output_source"] = (
                "layer",
                [
                    layer.path if layer.activation is None else layer.activation[0]
                    for layer in self.layers
                ],
                {
                    "long_name": "module whose output is the output stage",
                    "definition": "the layer itself (its output W h + b) or the activation "
                    "module that follows it (output_stage='activation')",
                },
            )
        attrs = {
            "config": json.dumps(settings.config(self.budget)),
            "timings": json.dumps({k: round(v, 4) for k, v in timings.items()}),
            "num_samples": 0 if record is None else record.n,
        }
        if settings.collapse:
            attrs["classes"] = json.dumps(torch.unique(record.all_labels()).tolist())
        root = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        groups = {
            f"layers/{layer.name}": self.layer_group(layer, matrices[layer.name], positions)
            for layer in self.layers
        }
        return xr.DataTree.from_dict({"/": root, **groups})

    def nfa_variables(self, matrices: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The NFA correlations along ``layer`` (NaN for layers in diagonal form)."""
        names = [layer.name for layer in self.layers]
        full = [name for name in names if self.forms[name] == "full"]
        values = {var: np.full(len(names), np.nan) for var in NFA_VARIABLES}
        reference = NFA_REFERENCE
        if full:
            corr = nfa_correlations(
                {name: matrices[name]["nfm"] for name in full},
                {name: matrices[name]["agop"] for name in full},
                powers=(0.5, 1.0),
                methods=("pearson", "cosine"),
            )
            for var, (method, power, _) in NFA_VARIABLES.items():
                picked = corr[f"nfa_{method}"].sel(power=power)
                for name in full:
                    values[var][names.index(name)] = float(picked.sel(layer=name))
        nfm_kind = "(W - W0)^T (W - W0)" if self.settings.centered_nfm else "W^T W"
        return {
            var: (
                "layer",
                values[var],
                {
                    "long_name": long_name,
                    "definition": (
                        f"{'Pearson correlation' if method == 'pearson' else 'cosine similarity'}"
                        f" of the flattened NFM = {nfm_kind} and AGOP^{power:g} (eigh, negative "
                        "eigenvalues clamped); NaN for layers in diagonal form"
                    ),
                    "reference": reference,
                },
            )
            for var, (method, power, long_name) in NFA_VARIABLES.items()
        }

    def layer_group(
        self, layer: ProbedLayer, entry: dict[str, torch.Tensor], positions: dict[str, int]
    ) -> xr.Dataset:
        """The group of one layer: its NFM and AGOP (or their diagonals) and attrs."""
        diagonal = self.forms[layer.name] == "diagonal"
        dims = ("feature_i",) if diagonal else ("feature_i", "feature_j")
        suffix = "_diag" if diagonal else ""
        nfm_kind = "(W - W0)^T (W - W0)" if self.settings.centered_nfm else "W^T W"
        meaning = {
            "nfm": ("Neural Feature Matrix", f"{nfm_kind}, W the (k, d) weight matrix"),
            "agop": ("Average Gradient Outer Product", AGOP_DEFINITION),
        }
        data_vars = {
            f"{key}{suffix}": (
                dims,
                value.cpu().numpy(),
                {
                    "long_name": meaning[key][0] + (" (diagonal)" if diagonal else ""),
                    "definition": meaning[key][1],
                },
            )
            for key, value in entry.items()
        }
        attrs = {
            "layer_type": layer.kind,
            "weight_shape": json.dumps(list(layer.module.weight.shape)),
            "fan_in": layer.shape[1],
            "matrix_form": self.forms[layer.name],
        }
        if layer.name in positions:
            attrs["positions"] = positions[layer.name]
        return xr.Dataset(data_vars, attrs=attrs)


def collapse_variables(
    names: list[str],
    stages: Sequence[str],
    results: dict[tuple[str, str], xr.Dataset | None],
) -> dict[str, Any]:
    """Collapse metrics along (``layer``, ``stage``), NaN where a layer's metrics were skipped."""
    done = [ds for ds in results.values() if ds is not None]
    return {
        metric: (
            ("layer", "stage"),
            np.array(
                [
                    [
                        np.nan
                        if results.get((name, stage)) is None
                        else float(results[name, stage][metric])
                        for stage in stages
                    ]
                    for name in names
                ]
            ),
            next(ds[metric].attrs for ds in done if metric in ds),
        )
        for metric in METRICS
        if any(metric in ds for ds in done)
    }
