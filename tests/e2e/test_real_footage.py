"""Issue 27's acceptance on real processes: footage of every length (1 s to 60 s), shape and orientation, a phone
clip stored sideways with a display rotation and a variable-frame-rate clip, prepped by `cogvx prep`'s job into
2 frame buckets x 3 resolution buckets (several windows taken from the long videos), then trained by 2 real DeepSpeed
CPU ranks with train.micro_batch_size 2 under ZeRO-2 and ZeRO-3: every micro-batch is one bucket's, a run killed
after a commit resumes bit-identical, and a resume on 1 rank continues the same global order."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from cogvx_dist.core.families import get_family
from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.core.shard_format import Manifest
from cogvx_dist.core.synthetic_videos import caption, render_clip, write_mp4
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
from tests.unit.test_decode import VFR_MS, _ffprobe_rotation, _tag_rotation, _write_vfr, needs_ffmpeg

pytestmark = [pytest.mark.slow, needs_ffmpeg]

STEPS = 6
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1}
"""Global batch 4 on 2 ranks: two one-bucket micro-batches a step."""
FRAME_BUCKETS = [17, 9]
"""2 s and 1 s at the family's 8 fps."""
RESOLUTIONS = [(32, 48), (48, 32), (32, 32)]
"""Landscape, portrait and square, as (height, width)."""

CLIPS = [  # name, (height, width) as stored, seconds, source fps
    ("long_landscape", (48, 64), 60.0, 16),  # windows of 17 frames spread over the minute
    ("landscape_3s", (48, 64), 3.0, 24),
    ("landscape_short", (48, 64), 1.25, 16),
    ("landscape_1s", (48, 64), 1.2, 30),
    ("portrait_3s", (64, 48), 3.0, 16),
    ("portrait_2s", (64, 48), 2.5, 24),
    ("portrait_short", (64, 48), 1.25, 16),
    ("square_5s", (48, 48), 5.0, 16),
    ("square_10s", (48, 48), 10.0, 12),
    ("square_short", (48, 48), 1.25, 16),
    ("square_1s", (48, 48), 1.1, 25),
]
COLOURS, SHAPES, DIRECTIONS = ("red", "green", "blue"), ("circle", "square"), ("left", "right", "up", "down")


@pytest.fixture(scope="module")
def footage(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(model, shards): the clips above, a rotated phone clip and a VFR clip, prepped once a session."""
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep

    model = tiny_checkpoint("CogVideoX-2b")

    def prep(root: Path) -> None:
        videos = root / "videos"
        rows = []
        for i, (name, (height, width), seconds, fps) in enumerate(CLIPS):
            words = (COLOURS[i % 3], SHAPES[i % 2], DIRECTIONS[i % 4])
            write_mp4(videos / f"{name}.mp4", render_clip(*words, round(seconds * fps), height, width, seed=i), fps)
            rows.append({"video": f"videos/{name}.mp4", "prompt": caption(*words)})
        # A phone held upright: stored 64 wide and 48 high with a 90-degree display rotation, shown portrait.
        write_mp4(root / "sideways.mp4", render_clip("blue", "circle", "up", 24, 48, 64, seed=99), 16)
        _tag_rotation(root / "sideways.mp4", videos / "phone_rotated.mp4", 90)
        rows.append({"video": "videos/phone_rotated.mp4", "prompt": caption("blue", "circle", "up")})
        _write_vfr(videos / "variable_rate.mp4", VFR_MS)  # 2 s: 60 fps, then 15 fps
        rows.append({"video": "videos/variable_rate.mp4", "prompt": "grey levels that count the frames"})
        (root / "clips.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = run_prep(PrepConfig(model=str(model), data=str(root / "clips.jsonl"), out=str(root / "shards"),
                                     storage_dtype="float32", shard_max_samples=4, progress=False,
                                     frames=FRAME_BUCKETS, buckets=RESOLUTIONS, clips_per_video=3))
        assert result.failed == 0, result

    return model, shared_folder(tmp_path_factory, "prep-2b-real-footage", prep) / "shards"


def keys_by_step(output: Path) -> dict[int, list[str]]:
    """step -> its samples over all ranks, sorted: the global order, whatever the rank count."""
    steps: dict[int, list[str]] = {}
    for step, _, _, key in read_trace(output):
        steps.setdefault(step, []).append(key)
    return {step: sorted(keys) for step, keys in steps.items()}


def test_the_footage_fills_two_frame_buckets_by_three_resolutions(footage):
    _, shards = footage
    buckets = {bucket.name: len(bucket.samples) for bucket in ShardIndex(shards).buckets()}
    expected = {f"{h}x{w}, {f} frames" for f in FRAME_BUCKETS for h, w in RESOLUTIONS}
    assert set(buckets) == expected, buckets
    assert all(count >= 2 for count in buckets.values()), buckets  # each holds a whole micro-batch
    index = ShardIndex(shards)
    keys = {index.key(i) for i in range(len(index))}
    long_windows = sorted(key for key in keys if key.startswith(_key_of("long_landscape")))
    assert len(long_windows) == 3, long_windows  # three windows of the minute-long video, each its own sample
    assert _ffprobe_rotation(shards.parent / "videos" / "phone_rotated.mp4") != 0
    manifest = Manifest.read(shards)
    assert manifest.num_samples == len(index)


def _key_of(name: str) -> str:
    from cogvx_dist.core.shard_format import sample_key

    return sample_key(f"videos/{name}.mp4")


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_one_bucket_micro_batches_train_and_resume_bit_identical(footage, tmp_path, zero):
    model, shards = footage
    index = ShardIndex(shards)
    bucket_of = {index.key(int(i)): bucket.name for bucket in index.buckets() for i in bucket.samples}

    straight = write_config(tmp_path / "straight.yaml", model, shards, tmp_path / "straight", train=TRAIN,
                            checkpoint={"every_steps": 3}, deepspeed={"config": zero})
    result = launch(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    batches = micro_batches(tmp_path / "straight")
    assert sorted(batches) == [(s, 0, r) for s in range(1, STEPS + 1) for r in (0, 1)]
    for keys in batches.values():
        assert len(keys) == 2 and len({bucket_of[key] for key in keys}) == 1, keys  # one bucket a micro-batch
    drawn = Counter(bucket_of[keys[0]] for keys in batches.values())
    assert len(drawn) >= 4, drawn  # 12 micro-batches over the six buckets
    # Throughput counts each sample at its own bucket's size: a step's tokens/s over samples/s is its mean.
    family = get_family("CogVideoX-2b")
    tokens_of = {index.key(int(i)): family.tokens_per_sample(*family.clip_of_latents(*bucket.shape[1:]))
                 for bucket in index.buckets() for i in bucket.samples}
    rows = [json.loads(line) for line in RunFolder(tmp_path / "straight").metrics.read_text().splitlines()]
    for row, (step, keys) in zip(rows, sorted(keys_by_step(tmp_path / "straight").items())):
        assert row["step"] == step
        mean_tokens = sum(tokens_of[key] for key in keys) / len(keys)
        assert row["tokens_per_s"] / row["samples_per_s"] == pytest.approx(mean_tokens, rel=1e-6), step
    assert len({row["tokens_per_s"] / row["samples_per_s"] for row in rows}) > 1  # the steps' mixes differ

    crashed = write_config(tmp_path / "crashed.yaml", model, shards, tmp_path / "crashed", train=TRAIN,
                           checkpoint={"every_steps": 3}, deepspeed={"config": zero})
    assert launch(crashed, env={FAULT_ENV: "train.committed=3"}).returncode != 0
    if zero == "zero2":  # the same commit, resumed on one rank with the global batch kept
        shutil.copytree(tmp_path / "crashed", tmp_path / "one_rank")
        one_rank = write_config(tmp_path / "one_rank.yaml", model, shards, tmp_path / "one_rank", train=TRAIN,
                                checkpoint={"every_steps": 3}, deepspeed={"config": zero})
    resumed = launch(crashed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(tmp_path / "crashed")["resumed_from_step"] == 3
    assert_same_adapter(tmp_path / "crashed", tmp_path / "straight")
    assert read_trace(tmp_path / "crashed") == read_trace(tmp_path / "straight")
    rows = [json.loads(line) for line in RunFolder(tmp_path / "crashed").metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # the resumed rows replace nothing twice
    if zero != "zero2":
        return

    alone = launch(one_rank, 1, "train.grad_accum_steps=2")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert summary_of(tmp_path / "one_rank")["resumed_from_step"] == 3
    assert keys_by_step(tmp_path / "one_rank") == keys_by_step(tmp_path / "straight")  # the same global order
    for (step, _, rank), keys in micro_batches(tmp_path / "one_rank").items():
        if step > 3:  # the resumed steps, all on the one rank
            assert rank == 0 and len({bucket_of[key] for key in keys}) == 1, (step, keys)
    rows = [json.loads(line) for line in RunFolder(tmp_path / "one_rank").metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
