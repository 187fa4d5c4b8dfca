"""Shared fixtures: deterministic generators, small problems, the reproduction example."""

import datetime
import importlib.util
import multiprocessing
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_psd(d: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random symmetric positive definite d×d matrix with a spread of eigenvalues."""
    A = torch.randn(d, d, generator=generator, dtype=dtype)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=dtype)


def direct_sq_distances(Z: torch.Tensor, X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """‖z_j − x_i‖²_M from explicit differences (m×n): an independent reference."""
    diff = Z[:, None, :] - X[None, :, :]
    return torch.einsum("mnd,de,mne->mn", diff, M, diff)


@pytest.fixture(scope="session")
def reproduce_dnc():
    """examples/reproduce_dnc.py as a module: tests check the code docs/reproducing.md runs."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        spec = importlib.util.spec_from_file_location(
            "reproduce_dnc", examples / "reproduce_dnc.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(examples))
    return module


# -- several processes: Gloo on localhost, a free port, a deadline ------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(target, rank: int, world_size: int, port: int, folder: str, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    outcome = {}
    try:
        outcome["result"] = target(rank, world_size, *args)
    except BaseException as err:  # reported to the test, which decides
        outcome["error"] = (type(err).__name__, str(err), traceback.format_exc())
    finally:
        torch.save(outcome, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


def run_ranks(target, world_size: int, folder, *args, timeout: float = 240.0) -> list[dict]:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` spawned processes joined by a
    Gloo process group on localhost; return each rank's ``{"result": ...}`` or ``{"error":
    (type name, message, traceback)}``. A run past ``timeout`` seconds kills every process and
    fails the test (a hang fails, never stalls CI). ``target`` must be importable (a module-level
    function of a test module)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(target, rank, world_size, port, str(folder), args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.1))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {timeout} s (a hang)")
    outcomes = []
    for rank in range(world_size):
        path = Path(folder) / f"rank{rank}.pt"
        if not path.exists():
            pytest.fail(f"rank {rank} died without a result (exit code {processes[rank].exitcode})")
        outcomes.append(torch.load(path, weights_only=False))
    return outcomes


def results(outcomes: list[dict]) -> list:
    """The results of ranks that all succeeded; a failing rank's traceback fails the test."""
    for rank, outcome in enumerate(outcomes):
        if "error" in outcome:
            pytest.fail(f"rank {rank} raised:\n{outcome['error'][2]}")
    return [outcome["result"] for outcome in outcomes]
