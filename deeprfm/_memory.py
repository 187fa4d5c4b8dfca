"""Device, dtype and memory-budget resolution shared by every blocked computation."""

from __future__ import annotations

import os
import warnings

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
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from err


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
    if memory_gb is not None:
        if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)):
            raise TypeError(f"memory_gb must be a positive number or None, got {memory_gb!r}")
        if not memory_gb > 0:
            raise ValueError(f"memory_gb must be positive, got {memory_gb!r}")
        return int(memory_gb * 1024**3)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_FREE_FRACTION * free)
    return int(min(DEFAULT_FREE_FRACTION * _available_host_bytes(), DEFAULT_CPU_CAP))


def kernel_block_budget(memory_gb: float | None, device: torch.device) -> int:
    """Bytes for one block of kernel temporaries on ``device``.

    An explicit ``memory_gb`` is used as given; by default the :func:`memory_budget`, and on
    the CPU at most :data:`CPU_KERNEL_BLOCK` (faster there than larger blocks).
    """
    budget = memory_budget(memory_gb, device)
    if memory_gb is None and device.type == "cpu":
        return min(budget, CPU_KERNEL_BLOCK)
    return budget


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
