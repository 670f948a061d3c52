"""A token budget per micro-batch (train.micro_batch_tokens) on two frame buckets, trained by 2 real DeepSpeed CPU
ranks: a micro-batch of short clips holds more of them, and a run killed after a committed checkpoint resumes to the
adapter an uninterrupted run ends with. (Micro-batches of one bucket at train.micro_batch_size 2, kill and resume,
are tested on prepped real footage in test_real_footage.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train.data.reader import ShardIndex
from tests.helpers import (
    assert_same_adapter,
    launch,
    micro_batches,
    read_trace,
    shared_folder,
    summary_of,
    write_config,
)

BUDGET_TRAIN = {"max_steps": 6, "micro_batch_size": 1, "grad_accum_steps": 1, "micro_batch_tokens": 500}
"""A budget of 500 tokens: 2 clips of 9 frames 32x32 (238 tokens each, text included) or 1 of 17 frames 32x64 (266)."""


@pytest.fixture(scope="module")
def frame_buckets(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(model, shards) of 6 clips of 9 frames at 32x32 and 6 of 17 frames at 32x64, in turn (once a session)."""
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards

    model = tiny_checkpoint("CogVideoX-2b")
    return model, shared_folder(tmp_path_factory, "frame-buckets-9x32x32-17x32x64", lambda folder: (
        write_synthetic_shards(folder, model, [4, 4, 4], geometries=[(9, 32, 32), (17, 32, 64)])))


def test_a_token_budget_batches_short_clips_more_and_resumes_bit_identical(frame_buckets, tmp_path):
    model, shards = frame_buckets
    index = ShardIndex(shards)
    size_of = {index.key(int(i)): 2 if bucket.shape[1] == 3 else 1 for bucket in index.buckets()
               for i in bucket.samples}
    straight = write_config(tmp_path / "straight.yaml", model, shards, tmp_path / "straight", train=BUDGET_TRAIN,
                            checkpoint={"every_steps": 3}, log={"every_steps": 1})
    result = launch(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path / "straight")
    assert summary["samples_seen"] == 12  # positions count micro-batch slots (micro_batch_size 1, 2 ranks, 6 steps)

    batches = micro_batches(tmp_path / "straight")
    assert sorted(batches) == [(s, 0, r) for s in range(1, 7) for r in (0, 1)]  # the same micro-steps
    for keys in batches.values():
        assert len({size_of[key] for key in keys}) == 1 and len(keys) == size_of[keys[0]], keys  # its bucket's size
    assert {len(keys) for keys in batches.values()} == {1, 2}
    rows = [json.loads(line) for line in RunFolder(tmp_path / "straight").metrics.read_text().splitlines()]
    for row in rows:  # samples/s counts the samples each step trained, not slots
        trained = sum(len(keys) for (step, _, _), keys in batches.items() if step == row["step"])
        assert row["samples_per_s"] * row["step_time_s"] == pytest.approx(trained, rel=1e-6)
    assert {round(row["samples_per_s"] * row["step_time_s"]) for row in rows} != {2}

    assert_kill_after_step_3_resumes_bit_identical(model, shards, tmp_path, BUDGET_TRAIN, {"every_steps": 1})


def assert_kill_after_step_3_resumes_bit_identical(model: Path, shards: Path, tmp_path: Path, train: dict,
                                                   log: dict) -> None:
    """The run of tmp_path/straight again as tmp_path/crashed, killed right after its step-3 commit and resumed:
    the same adapter (checksums and tensors) and the same samples at every step, none twice."""
    crashed = write_config(tmp_path / "crashed.yaml", model, shards, tmp_path / "crashed", train=train,
                           checkpoint={"every_steps": 3}, log=log)
    killed = launch(crashed, env={FAULT_ENV: "train.committed=3"})
    assert killed.returncode != 0
    assert [step for step, _ in RunFolder(tmp_path / "crashed").complete_checkpoints()] == [3]
    resumed = launch(crashed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, summary = summary_of(tmp_path / "crashed"), summary_of(tmp_path / "straight")
    assert again["resumed_from_step"] == 3 and again["adapter_checksums"] == summary["adapter_checksums"]
    assert_same_adapter(tmp_path / "straight", tmp_path / "crashed")
    assert read_trace(tmp_path / "crashed") == read_trace(tmp_path / "straight")
