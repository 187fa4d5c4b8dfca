"""The compute configuration: device, dtype and memory budget, resolved once per computation.

One meaning of the budget, used everywhere (docs/design.md, *The memory-budget contract*):
``memory_gb`` bounds, in GiB, the temporaries of one blocked computation (kernel blocks, AGOP
blocks, EigenPro batches, collapse statistics); ``None`` takes :data:`DEFAULT_FREE_FRACTION` of
the free memory of the device, at most :data:`DEFAULT_CPU_CAP` on the CPU. On the CPU a kernel
block is moreover never larger than :data:`CPU_KERNEL_BLOCK` (a speed choice, within any
budget). An estimator resolves its :class:`Compute` once per ``fit`` and passes it down, so one
fit runs under one budget however much the free memory changes while it runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from analysis._common import user_stacklevel

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

#: Fraction of the free memory that a computation may use when no budget is given.
DEFAULT_FREE_FRACTION = 0.3
#: Upper bound of the default CPU memory budget in bytes.
DEFAULT_CPU_CAP = 2 * 1024**3
#: Default size of one block of kernel temporaries on the CPU, in bytes. Larger kernel blocks
#: are slower, not faster: the memory-bound passes over freshly allocated arrays of hundreds of
#: MB (the distance expansion's copy and comparison) cost about 3x more per element. One
#: n = 20 000, d = 784 kernel evaluation took 4.5 s in 256 MiB blocks and 6.7 s in 2 GiB ones.
CPU_KERNEL_BLOCK = 256 * 1024**2

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the torch device to compute on.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` selects CUDA when available, else the CPU.

    Raises
    ------
    ValueError
        Not a device name, or a CUDA device on a machine without CUDA.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Return a floating torch dtype (float32 or float64) given a dtype or its name."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _available_host_bytes() -> int:
    """Available RAM, and no more than the address space the process may still map."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        return 8 * 1024**3
    limit = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else -1
    if limit in (-1, getattr(resource, "RLIM_INFINITY", -1)):
        return free
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            mapped = int(statm.read().split()[0]) * page
    except (OSError, ValueError, IndexError):  # pragma: no cover - no procfs
        mapped = 0
    return max(0, min(free, limit - mapped))


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` right now: free CUDA memory, or available host RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(_available_host_bytes())


def check_fits(needed: int, budget: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse a request larger than the free memory; warn when it exceeds the budget.

    Parameters
    ----------
    needed : int
        Bytes the computation will hold at once.
    budget : int
        The memory budget in bytes (:func:`memory_budget`).
    device : torch.device
    what : str
        The request, for the messages (e.g. "solver='direct' at n=200000").
    advice : str
        What to do instead.

    Raises
    ------
    MemoryError
        ``needed`` exceeds the free memory of ``device``: raised before any allocation.
    """
    gib = 1024**3
    free = available_bytes(device)
    if needed > free:
        raise MemoryError(
            f"{what} needs {needed / gib:.2f} GiB, more than the {free / gib:.2f} GiB free on "
            f"{device} (memory budget {budget / gib:.2f} GiB); {advice}"
        )
    if needed > budget:
        warnings.warn(
            f"{what} needs {needed / gib:.2f} GiB, more than the memory budget of "
            f"{budget / gib:.2f} GiB (memory_gb); {advice}",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def check_memory_gb(memory_gb: float | None) -> None:
    """Raise TypeError/ValueError unless ``memory_gb`` is None or a positive finite number."""
    if memory_gb is None:
        return
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)):
        raise TypeError(f"memory_gb must be a positive number or None, got {memory_gb!r}")
    if not 0 < memory_gb < float("inf"):
        raise ValueError(f"memory_gb must be a positive finite number, got {memory_gb!r}")


def memory_budget(memory_gb: float | None, device: torch.device) -> int:
    """Return the memory budget in bytes for blocked computations on ``device``.

    Parameters
    ----------
    memory_gb : float or None
        Explicit budget in GiB. ``None`` takes a safe fraction of the free memory
        of the device (CUDA: free device memory; CPU: available RAM, capped).
    device : torch.device
        Where the computation runs.
    """
    check_memory_gb(memory_gb)
    if memory_gb is not None:
        return int(memory_gb * 1024**3)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_FREE_FRACTION * free)
    return int(min(DEFAULT_FREE_FRACTION * _available_host_bytes(), DEFAULT_CPU_CAP))


def kernel_block_budget(memory_gb: float | None, device: torch.device) -> int:
    """Bytes for one block of kernel temporaries on ``device``: the :func:`memory_budget`, and
    on the CPU at most :data:`CPU_KERNEL_BLOCK` (faster there than larger blocks)."""
    budget = memory_budget(memory_gb, device)
    return min(budget, CPU_KERNEL_BLOCK) if device.type == "cpu" else budget


@dataclass(frozen=True)
class Compute:
    """Where a fit or measurement computes, in which precision, and the memory it may use.

    Resolved once per ``fit`` by :meth:`resolve` and passed down to every kernel, solver and
    AGOP call of that fit (as ``memory_gb=compute.memory_gb``, an explicit number), so that the
    budget does not move while the fit runs.

    Attributes
    ----------
    device : torch.device
    dtype : torch.dtype
        torch.float32 or torch.float64.
    budget : int
        The memory budget in bytes (:func:`memory_budget`).
    """

    device: torch.device
    dtype: torch.dtype
    budget: int

    @classmethod
    def resolve(
        cls,
        device: str | torch.device | None,
        dtype: torch.dtype | str,
        memory_gb: float | None,
    ) -> Compute:
        """Validate and resolve an estimator's ``device``, ``dtype`` and ``memory_gb``.

        ``device=None`` selects CUDA when available; ``memory_gb=None`` a safe fraction of the
        device's free memory, measured now.
        """
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype), memory_budget(memory_gb, resolved))

    @property
    def memory_gb(self) -> float:
        """The budget in GiB, as the ``memory_gb`` argument of the blocked functions."""
        return self.budget / 1024**3


def rows_per_block(budget_bytes: int, bytes_per_row: int, total_rows: int, minimum: int = 1) -> int:
    """Number of rows of a blocked computation that fit in ``budget_bytes``.

    Parameters
    ----------
    budget_bytes : int
        Memory allowed for one block.
    bytes_per_row : int
        Memory one row of the block needs.
    total_rows : int
        Rows in total; the result never exceeds it.
    minimum : int
        Rows always allowed, even when the budget is smaller (a block of this many
        rows is the least work that can make progress).
    """
    rows = budget_bytes // max(bytes_per_row, 1)
    return int(max(min(rows, total_rows), min(minimum, total_rows), 1))
