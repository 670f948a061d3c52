"""Which device each process uses (training and prep ranks by local rank, the watcher beside a training run), and
what a rank process does at start-up besides (CPU threads, the garbage collector's pause)."""

from __future__ import annotations

import gc
from collections import Counter

import pytest

from cogvx_dist.core.devices import cpu_threads_per_rank, rank_device, side_device
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.launch_env import env_local_world_size
from cogvx_dist.core.process import defer_garbage_collection, resume_garbage_collection


@pytest.mark.parametrize("visible", [1, 2, 8])
def test_local_ranks_take_distinct_gpus_then_share_them_evenly(visible):
    one_each = [rank_device(local_rank, visible) for local_rank in range(visible)]
    assert len(set(one_each)) == visible and one_each[0] == "cuda:0"
    assert all(device.startswith("cuda:") and int(device[5:]) < visible for device in one_each)
    three_each = Counter(rank_device(local_rank, visible) for local_rank in range(3 * visible))
    assert three_each == {f"cuda:{index}": 3 for index in range(visible)}


def test_without_a_gpu_every_rank_uses_the_cpu_and_a_negative_rank_is_refused():
    assert {rank_device(local_rank, 0) for local_rank in range(4)} == {"cpu"}
    with pytest.raises(CogvxError, match="local rank must be >= 0"):
        rank_device(-1, 8)


def test_work_beside_training_takes_the_freest_gpu_not_gpu_0():
    gib = 2**30
    assert side_device([20 * gib, 140 * gib]) == "cuda:1"  # rank 0 trains on GPU 0
    assert side_device([140 * gib, 20 * gib]) == "cuda:0"  # ...unless GPU 0 is the free one
    assert side_device([10 * gib, 80 * gib, 80 * gib]) == "cuda:2"  # a tie goes to the highest index
    assert side_device([]) == "cpu"


@pytest.mark.parametrize("cores, local_ranks, threads", [(2, 2, 1), (16, 8, 2), (2, 4, 1), (64, 1, 64), (7, 2, 3)])
def test_cpu_ranks_share_the_cores(cores, local_ranks, threads):
    assert cpu_threads_per_rank(cores, local_ranks) == threads


@pytest.mark.parametrize("env, size", [({"LOCAL_WORLD_SIZE": "4"}, 4), ({"LOCAL_SIZE": "2"}, 2),
                                       ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8), ({"MPI_LOCALNRANKS": "3"}, 3),
                                       ({}, 1)])
def test_ranks_on_this_node_come_from_any_launcher(env, size):
    assert env_local_world_size(env) == size


def test_start_up_pauses_the_collector_and_its_end_freezes_what_was_built():
    gc.collect()
    defer_garbage_collection()
    try:
        assert not gc.isenabled()
        built = [[index] for index in range(1000)]  # what imports and set-up leave behind, alive for the run
        resume_garbage_collection()
        assert gc.isenabled() and gc.get_freeze_count() >= len(built)
        frozen = gc.get_freeze_count()
        resume_garbage_collection()  # not paused: nothing to resume, nothing more frozen
        # Not "==": frozen objects that other threads of the test process drop (xdist's, tqdm's) leave the count.
        assert gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
        gc.enable()
