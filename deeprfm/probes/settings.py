"""A probe's settings, resolved once when it is built and passed to every part of a measurement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ProbeSettings"]


@dataclass(frozen=True)
class ProbeSettings:
    """What a :class:`~deeprfm.probes.NeuralProbe` measures, validated.

    Attributes
    ----------
    agop, nfm, collapse : bool
        Which quantities are measured.
    stages : tuple of str
        Collapse stages, in the order of :data:`deeprfm.probes.stages.STAGES`.
    output_stage : {"layer", "activation"}
    agop_outputs : "exact", "random" or int
        As given; ``projections`` is its meaning (None: one cotangent per output).
    projections : int or None
    centered_nfm : bool
    max_samples, random_state : int or None
    verbose : bool
    explicit_layers : bool
        The layers were named (a layer that does not run is then an error, not a warning).
    model_name : str
        The model's class name, for the result's configuration.
    device : torch.device or None
        Where batches go; None: the model's device.
    """

    agop: bool
    nfm: bool
    collapse: bool
    stages: tuple[str, ...]
    output_stage: str
    agop_outputs: str | int
    projections: int | None
    centered_nfm: bool
    max_samples: int | None
    random_state: int | None
    verbose: bool
    explicit_layers: bool
    model_name: str
    device: torch.device | None

    def config(self, budget: int) -> dict:
        """The settings as JSON values, with the memory budget in bytes."""
        config = asdict(self)
        for name in ("verbose", "explicit_layers", "device", "model_name"):
            del config[name]
        return config | {
            "stages": list(self.stages),
            "memory_budget_bytes": budget,
            "model": self.model_name,
        }
