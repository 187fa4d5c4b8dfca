"""Data parallelism over ``torch.distributed``: the communicator every distributed fit uses.

A fit runs on the processes of a process group (launched by ``torchrun``: NCCL on GPUs, Gloo on
CPUs), each holding a shard of the training rows. The solvers and the AGOP compute their kernel
products on the local shard and combine them with the collectives of :class:`Communicator`;
with a single process (no group) the same code runs and every collective is the identity, so
there is one code path. See docs/distributed.md.

Every collective goes through :meth:`Communicator.all_reduce` / :meth:`~Communicator.all_gather`
/ :meth:`~Communicator.broadcast`, which count the numbers they pass (``numbers_sent``) and first
exchange a status word: a rank that raises inside :meth:`Communicator.failures` announces its
failure at its next collective, so every other rank raises :class:`RemoteRankError` at theirs
instead of waiting forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Communicator", "RemoteRankError", "resolve_communicator", "shard_rows"]


class RemoteRankError(RuntimeError):
    """Another rank of the process group raised an error; its own traceback says which."""


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """The rows of rank ``rank`` among ``world_size`` near-equal contiguous shards of n rows.

    The first ``n % world_size`` ranks hold one row more than the others.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class Communicator:
    """The processes of one fit and the collectives between them.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None
        The process group; None: a single process (every collective is the identity).
    device : torch.device
        Where the status words live: the computation device for NCCL (CUDA), the CPU for Gloo.

    Attributes
    ----------
    rank, world_size : int
    numbers_sent : int
        Numbers (tensor elements) passed to collectives so far, status words excluded: the
        communication volume of the fit.
    """

    def __init__(self, group: Any = None, device: torch.device | None = None) -> None:
        self.group = group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.world_size = 1 if group is None else dist.get_world_size(group)
        backend = None if group is None else dist.get_backend(group)
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.numbers_sent = 0
        self._failed = False

    @property
    def is_root(self) -> bool:
        """True on the rank that writes files, logs and progress bars (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    # -- failures ----------------------------------------------------------------------------

    def _check_status(self, failed: bool) -> None:
        """Exchange one status word per rank; raise RemoteRankError if another rank failed."""
        status = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        status[self.rank] = int(failed)
        dist.all_reduce(status, group=self.group)
        failed_ranks = status.nonzero().flatten().tolist()
        if failed_ranks and not failed:
            raise RemoteRankError(
                f"rank {self.rank}: rank(s) {failed_ranks} of the process group raised an error "
                "(see their traceback); this rank stops too"
            )

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Run a distributed computation: if this rank raises, tell the others, then re-raise.

        The other ranks raise :class:`RemoteRankError` at their next collective. A
        RemoteRankError itself is not announced again.
        """
        try:
            yield
        except RemoteRankError:
            raise
        except BaseException:
            if self.distributed and not self._failed:
                self._failed = True
                with contextlib.suppress(Exception):  # the others may be gone already
                    self._check_status(failed=True)
            raise

    # -- collectives -------------------------------------------------------------------------

    def _prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_status(failed=False)
        self.numbers_sent += tensor.numel()
        return tensor.to(self.device) if self.device != tensor.device else tensor.clone()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (``op="max"``: the maximum) of ``tensor`` over the ranks, as a new tensor on
        the tensor's device; the tensor itself is not modified."""
        if not self.distributed:
            return tensor
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        work = self._prepare(tensor)
        dist.all_reduce(work, op=reduce_op, group=self.group)
        return work.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor`` (r_k, ...) of every rank k, concatenated in rank order; the
        ranks may hold different numbers of rows."""
        if not self.distributed:
            return tensor
        counts = self.all_reduce(self._one_hot(tensor.shape[0]))
        longest = int(counts.max())
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        work = self._prepare(padded)
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(parts, work, group=self.group)
        rows = [part[: int(count)] for part, count in zip(parts, counts, strict=True)]
        return torch.cat(rows).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank (same shape and dtype on every rank)."""
        if not self.distributed:
            return tensor
        work = self._prepare(tensor)
        dist.broadcast(work, src=dist.get_global_rank(self.group, src), group=self.group)
        return work.to(tensor.device)

    def total(self, value: float) -> float:
        """The sum of a number over the ranks."""
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64))[0])

    def _one_hot(self, value: int) -> torch.Tensor:
        counts = torch.zeros(self.world_size, dtype=torch.int64)
        counts[self.rank] = value
        return counts

    def row_counts(self, rows: int) -> np.ndarray:
        """The number of rows every rank holds, in rank order."""
        return self.all_reduce(self._one_hot(rows)).numpy()


def resolve_communicator(process_group: Any, device: torch.device) -> Communicator:
    """The :class:`Communicator` of an estimator's ``process_group`` parameter.

    ``"auto"``: the default process group when ``torch.distributed`` is initialised with more
    than one process, else a single process; None: a single process; a ProcessGroup: that group.
    """
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"process_group must be 'auto', None or a ProcessGroup, got {process_group!r}"
            )
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Communicator(None)
        return Communicator(dist.group.WORLD, device)
    if process_group is None:
        return Communicator(None)
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be 'auto', None or a ProcessGroup, got {type(process_group)}"
        )
    return Communicator(process_group, device)
