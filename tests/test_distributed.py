"""Data parallelism: the communicator's collectives, failures and byte counts on 2 processes."""

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import results, run_ranks

from deeprfm.data import load_dataset
from deeprfm.distributed import (
    Communicator,
    resolve_communicator,
    shard_rows,
)


def _collectives(rank, world_size):
    comm = resolve_communicator("auto", torch.device("cpu"))
    assert comm.distributed and comm.world_size == world_size and comm.rank == rank
    mine = torch.full((rank + 2, 3), float(rank + 1), dtype=torch.float64)  # uneven rows
    gathered = comm.all_gather(mine)
    summed = comm.all_reduce(torch.tensor([1.0, rank], dtype=torch.float64))
    largest = comm.all_reduce(torch.tensor([rank], dtype=torch.float64), op="max")
    sent = torch.arange(4.0) if rank == 0 else torch.zeros(4)
    broadcast = comm.broadcast(sent)
    return {
        "gathered": gathered,
        "summed": summed,
        "largest": largest,
        "broadcast": broadcast,
        "mine_unchanged": bool((mine == rank + 1).all()),
        "counts": comm.row_counts(rank + 2),
        "numbers_sent": comm.numbers_sent,
        "root": comm.is_root,
    }


def test_collectives_on_two_processes(tmp_path):
    first, second = results(run_ranks(_collectives, 2, tmp_path))
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)]).double()
    for outcome in (first, second):
        torch.testing.assert_close(outcome["gathered"], expected)
        torch.testing.assert_close(outcome["summed"], torch.tensor([2.0, 1.0]).double())
        assert float(outcome["largest"]) == 1.0
        torch.testing.assert_close(outcome["broadcast"], torch.arange(4.0))
        assert outcome["mine_unchanged"]
        assert outcome["counts"].tolist() == [2, 3]
    assert first["root"] and not second["root"]
    # numbers passed: the gather's row counts (2) and padded rows (3 x 3), the sum (2), the max
    # (1), the broadcast (4) and the row counts (2) -- status words not counted
    assert first["numbers_sent"] == second["numbers_sent"] == 2 + 9 + 2 + 1 + 4 + 2


def _one_rank_raises(rank, world_size):
    comm = resolve_communicator("auto", torch.device("cpu"))
    start = time.monotonic()
    with comm.failures():
        if rank == 1:
            raise ValueError("bad data on rank 1")
        comm.all_reduce(torch.ones(3))  # rank 1 never gets here
    return time.monotonic() - start


def test_a_rank_that_raises_stops_every_rank(tmp_path):
    start = time.monotonic()
    outcomes = run_ranks(_one_rank_raises, 2, tmp_path, timeout=120)
    assert time.monotonic() - start < 60  # far from the 60 s collective timeout
    assert outcomes[1]["error"][:2] == ("ValueError", "bad data on rank 1")
    kind, message, _ = outcomes[0]["error"]
    assert kind == "RemoteRankError" and "rank(s) [1]" in message


def test_a_single_process_communicates_nothing():
    comm = resolve_communicator("auto", torch.device("cpu"))
    assert not dist.is_initialized() and not comm.distributed and comm.is_root
    tensor = torch.ones(3)
    assert comm.all_reduce(tensor) is tensor and comm.all_gather(tensor) is tensor
    assert comm.total(2.5) == 2.5 and comm.numbers_sent == 0
    assert Communicator(None).row_counts(7).tolist() == [7]
    with pytest.raises(ValueError, match="process_group"):
        resolve_communicator("world", torch.device("cpu"))
    with pytest.raises(TypeError, match="process_group"):
        resolve_communicator(3, torch.device("cpu"))


@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_shards_cover_the_rows_once(n, world_size):
    shards = [shard_rows(n, rank, world_size) for rank in range(world_size)]
    rows = [i for shard in shards for i in range(n)[shard]]
    assert rows == list(range(n))
    sizes = [len(range(n)[shard]) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_loaders_give_each_rank_its_shard():
    X, y = load_dataset("digits", split="test", n=101, random_state=3)
    parts = [
        load_dataset("digits", split="test", n=101, random_state=3, shard=(r, 3)) for r in range(3)
    ]
    np.testing.assert_array_equal(np.concatenate([part[0] for part in parts]), X)
    np.testing.assert_array_equal(np.concatenate([part[1] for part in parts]), y)
    assert [len(part[1]) for part in parts] == [34, 34, 33]
    with pytest.raises(ValueError, match="random_state"):
        load_dataset("digits", n=100, shard=(0, 2))
    with pytest.raises(ValueError, match="rank"):
        load_dataset("digits", shard=(2, 2))
    with pytest.raises(TypeError, match="shard"):
        load_dataset("digits", shard=[0, 2])
