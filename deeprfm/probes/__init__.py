"""Probes on trained torch networks: per-layer NFM, AGOP, NFA correlations and collapse.

One concern per module: :mod:`.layers` (which layers, their weight matrices), :mod:`.hooks`
(forward hooks and the evaluation mode), :mod:`.batches` (the data), :mod:`.gradients` (the
gradient pass and the AGOP sums), :mod:`.stages` and :mod:`.collapse` (the collapse passes),
:mod:`.result` (the DataTree), :mod:`.settings`; :class:`NeuralProbe` (:mod:`.probe`)
orchestrates them.
"""

from deeprfm.agop import DEFAULT_PROJECTIONS
from deeprfm.probes.batches import PAIR_BATCH_SIZE
from deeprfm.probes.probe import NeuralProbe

__all__ = ["DEFAULT_PROJECTIONS", "PAIR_BATCH_SIZE", "NeuralProbe"]
