"""Micro-batches of one bucket each (train.micro_batch_size > 1 over several resolutions x frame counts), on real
shards: the sample's bucket from its tensors header, one bucket per micro-batch, units independent of the rank split,
the order a pure function of the seed, a one-bucket dataset's order unchanged, proportions and remainders per
epoch, and the pre-flight's one-line refusals."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from cogvx_dist.core import shard_format
from cogvx_dist.core.config_files import load_config
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.loading import describe_checkpoint
from cogvx_dist.core.shard_format import Manifest, ShardEntry
from cogvx_dist.core.storage import Store
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.data.reader import (
    TENSORS_HEAD_BYTES,
    BatchSplit,
    Bucket,
    BucketedStream,
    MicroBatches,
    SampleStream,
    ShardIndex,
)
from cogvx_dist.train.preflight import preflight
from tests.helpers import shared_folder

LANDSCAPE, PORTRAIT, STILL = (9, 32, 48), (9, 48, 32), (1, 32, 48)
"""(frames, height, width) of the buckets the tests fill; the tiny 2b model takes all three."""


def write_bucketed_shards(folder: Path, model: Path, counts: dict[tuple[int, int, int], int],
                          shard_samples: int = 3, seed: int = 0) -> Manifest:
    """Real-format shards (tars, index.safetensors, manifest, empty prompt) holding counts[(frames, height, width)]
    samples of each bucket, the buckets taken in turn so that none is a run of global indices; each sample's JSON
    records its frames and size as prep's do. core/synthetic_shards.py writes one bucket only."""
    info = describe_checkpoint(model)
    family, config = info.family, info.transformer_config
    sizes = list(dict.fromkeys((height, width) for _, height, width in counts))
    clip_frames = {frames for frames, _, _ in counts} - {1}
    assert clip_frames <= {info.frames}, "one clip length a dataset"
    header = shard_format.manifest_header(
        family, str(model), vae_scaling_factor=family.vae_scaling_factor, latent_channels=config["out_channels"],
        text_embed_dim=config["text_embed_dim"], frames=info.frames, buckets=sizes, fps=family.fps,
        storage_dtype="float32", single_images=any(frames == 1 for frames, _, _ in counts))
    left = dict(counts)
    order = []
    while any(left.values()):
        for bucket in counts:
            if left[bucket]:
                order.append(bucket)
                left[bucket] -= 1
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_number, start in enumerate(range(0, len(order), shard_samples)):
        path = folder / shard_format.shard_name(0, shard_number)
        keys, digests = [], []
        with wds.TarWriter(str(path)) as sink:
            for number in range(start, min(start + shard_samples, len(order))):
                frames, height, width = order[number]
                shape = family.latent_shape(config["out_channels"], frames, height, width)
                mean = torch.randn(*shape, generator=generator)
                tensors = {shard_format.LATENT_MEAN: mean, shard_format.LATENT_LOGVAR: torch.full_like(mean, -6.0),
                           shard_format.PROMPT_EMBEDS: torch.randn(header["text_max_length"],
                                                                   header["text_embed_dim"], generator=generator)}
                key = f"sample{number:06d}"
                sample = shard_format.encode_sample(key, tensors, {"prompt": key, "frames": frames, "height": height,
                                                                   "width": width})
                sink.write(sample)
                keys.append(key)
                digests.append(shard_format.sample_digest(sample))
        shards.append(ShardEntry(path.name, len(keys), path.stat().st_size, shard_format.file_sha256(path), keys,
                                 digests, shard_format.member_rows(path, keys)))
    shard_format.write_empty_prompt(folder, torch.zeros(header["text_max_length"], header["text_embed_dim"]))
    manifest = Manifest(**header, shards=shards)
    manifest.write(folder)
    return manifest


@pytest.fixture(scope="module")
def bucketed(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(model, shards) of 7 landscape clips, 4 portrait clips and 3 stills in shards of 3 (made once a session)."""
    model = tiny_checkpoint("CogVideoX-2b")
    shards = shared_folder(tmp_path_factory, "bucketed-7-4-3", lambda folder: write_bucketed_shards(
        folder, model, {LANDSCAPE: 7, PORTRAIT: 4, STILL: 3}))
    return model, shards


def bucket_of_keys(index: ShardIndex) -> dict[str, str]:
    return {index.key(int(i)): bucket.name for bucket in index.buckets() for i in bucket.samples}


def micro_batch_keys(shards: Path, micro: int, accum: int, dp: int, steps: int, seed: int = 3,
                     start_step: int = 0) -> dict[int, list[tuple[str, ...]]]:
    """step -> the keys of each micro-batch of that step over all ranks (in rank-major order), read for real."""
    batches: dict[int, list[tuple[str, ...]]] = {}
    for rank in range(dp):
        split = BatchSplit(micro, accum, rank, dp)
        reader = MicroBatches(ShardIndex(shards), split, seed, start_step * split.global_batch, steps)
        for micro_index in range(len(reader)):
            batch = reader[micro_index]
            assert batch["latent_mean"].shape[0] == micro  # it stacked: one shape
            batches.setdefault(start_step + micro_index // accum, []).append(tuple(batch["keys"]))
    return batches


# ------------------------------------------------------------------------------------------------ buckets of samples
def test_each_samples_bucket_comes_from_its_tensors_header_alone(bucketed, monkeypatch):
    _, shards = bucketed
    index = ShardIndex(shards)
    assert set(index.samples.__dataclass_fields__) == {"shard", "members", "keys", "digests", "num_shards"}  # no shapes
    read = []
    original = Store.open

    def counting_open(self, name):
        handle = original(self, name)
        plain_read = handle.read

        def counted(size=-1):
            data = plain_read(size)
            read.append(len(data))
            return data

        handle.read = counted
        return handle

    monkeypatch.setattr(Store, "open", counting_open)
    buckets = index.buckets()
    assert [(b.name, len(b.samples)) for b in buckets] == [("32x48, 1 frame", 3), ("32x48, 9 frames", 7),
                                                           ("48x32, 9 frames", 4)]
    assert len(read) == 14 and max(read) <= TENSORS_HEAD_BYTES  # one small read a sample, headers only
    assert sum(read) < sum(shard.bytes for shard in index.manifest.shards) / 5
    for bucket in buckets:
        for i in bucket.samples.tolist():
            tensors, meta = index.read(i)
            assert tuple(tensors["latent_mean"].shape) == bucket.shape
            assert f"{meta['height']}x{meta['width']}, {meta['frames']} frame" in bucket.name
    assert sorted(i for b in buckets for i in b.samples.tolist()) == list(range(14)) and not index.unshaped


# ------------------------------------------------------------------------------------------------ the order
def test_every_micro_batch_is_one_bucket_and_each_rank_runs_the_same_micro_steps(bucketed):
    _, shards = bucketed
    names = bucket_of_keys(ShardIndex(shards))
    steps = micro_batch_keys(shards, micro=2, accum=2, dp=2, steps=6)
    assert sorted(steps) == list(range(6)) and all(len(units) == 4 for units in steps.values())
    for units in steps.values():
        for keys in units:
            assert len({names[key] for key in keys}) == 1, keys
            assert len(set(keys)) == 2  # a unit never holds a sample twice
    assert len({names[keys[0]] for units in steps.values() for keys in units}) == 3  # all buckets take part


def test_the_units_of_a_step_do_not_depend_on_the_rank_split_or_a_resume(bucketed):
    _, shards = bucketed
    two_ranks = micro_batch_keys(shards, micro=2, accum=1, dp=2, steps=8)
    one_rank = micro_batch_keys(shards, micro=2, accum=2, dp=1, steps=8)
    assert two_ranks == one_rank  # unit k = s*accum*dp + m*dp + r: the same units, in the same order
    four = micro_batch_keys(shards, micro=2, accum=1, dp=4, steps=4)  # global batch 8
    assert four == {s: two_ranks[2 * s] + two_ranks[2 * s + 1] for s in range(4)}
    resumed = micro_batch_keys(shards, micro=2, accum=1, dp=2, steps=3, start_step=5)
    assert resumed == {s: two_ranks[s] for s in (5, 6, 7)}


def test_the_order_is_a_pure_function_of_the_seed(bucketed):
    _, shards = bucketed
    first = micro_batch_keys(shards, micro=2, accum=2, dp=2, steps=5, seed=3)
    assert micro_batch_keys(shards, micro=2, accum=2, dp=2, steps=5, seed=3) == first
    assert micro_batch_keys(shards, micro=2, accum=2, dp=2, steps=5, seed=4) != first
    stream = ShardIndex(shards).stream(3, 2)
    later_first = [stream.unit(k) for k in (40, 3, 17, 3)]  # random access in any order
    fresh = ShardIndex(shards).stream(3, 2)
    assert later_first == [fresh.unit(k) for k in (40, 3, 17, 3)]
    assert [stream.sample_at(p) for p in (6, 7)] == stream.unit(3)  # positions count samples: unit k at k*micro


def test_a_one_bucket_dataset_keeps_the_order_it_always_had(synthetic_shards, bucketed, tmp_path):
    """The positions of every micro-batch are SampleStream's, as before batch units: for one bucket (also one the
    manifest lists two of, the samples filling one) with micro_batch_size 2, and for several with micro_batch_size
    1."""
    _, one_bucket = synthetic_shards((3, 3, 2))
    relisted = tmp_path / "relisted"
    shutil.copytree(one_bucket, relisted)
    manifest = Manifest.read(relisted)
    manifest.buckets = [[manifest.height, manifest.width], [manifest.width, manifest.height]]
    manifest.write(relisted)
    for shards, micro in ((one_bucket, 2), (relisted, 2), (bucketed[1], 1)):
        index = ShardIndex(shards)
        before = SampleStream(len(index), seed=5)  # what the reader read before batch units
        for split in (BatchSplit(micro, 2, 0, 2), BatchSplit(micro, 2, 1, 2), BatchSplit(micro, 1, 0, 1)):
            reader = MicroBatches(index, split, seed=5, start_position=3 * split.global_batch, steps=7)
            assert isinstance(reader.stream, SampleStream)
            for micro_index in range(len(reader)):
                positions = split.positions(3 * split.global_batch, micro_index)
                assert reader.samples_of(micro_index) == [before.sample_at(p) for p in positions]
            batch = reader[len(reader) - 1]
            assert batch["keys"] == [index.key(before.sample_at(p)) for p in positions]


def test_buckets_come_in_proportion_and_each_sample_once_an_epoch_but_for_remainders():
    buckets = [Bucket((16, 3, 4, 6), "a", torch.arange(0, 60, 2)),  # 30 samples: 7 units of 4, 2 left out
               Bucket((16, 3, 6, 4), "b", torch.arange(1, 40, 2)),  # 20: 5 units, none left out
               Bucket((16, 1, 4, 6), "c", torch.arange(60, 71))]  # 11: 2 units, 3 left out
    stream = BucketedStream(buckets, micro_batch_size=4, seed=9)
    assert stream.units_per_epoch == 14 and stream.left_out == {"a": 2, "b": 0, "c": 3}
    assert stream.left_out_per_epoch == 5
    orders, left_out = [], []
    for epoch in range(4):
        units = range(epoch * 14, (epoch + 1) * 14)
        kinds = [stream.bucket_at(k).name for k in units]
        assert Counter(kinds) == {"a": 7, "b": 5, "c": 2}  # exact proportions every epoch
        samples = [i for k in units for i in stream.unit(k)]
        assert len(samples) == len(set(samples)) == 56  # each sample at most once an epoch
        for k in units:
            assert len({int(stream._bucket_of[i]) for i in stream.unit(k)}) == 1
        left_out.append(frozenset(range(71)) - set(samples) - set(range(41, 60, 2)))
        assert len(left_out[-1]) == 5
        orders.append(kinds)
    assert len(set(map(tuple, orders))) == 4 and orders[0] != sorted(orders[0])  # mixed, a new mix each epoch
    assert len(set(left_out)) > 1  # a fresh draw of who is left out
    with pytest.raises(CogvxError, match="no bucket holds a whole micro-batch"):
        BucketedStream(buckets[2:], micro_batch_size=12, seed=9)


def test_a_bad_sample_is_replaced_by_one_of_its_own_bucket(bucketed, tmp_path):
    _, shards = bucketed
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = ShardIndex(copy)
    stream = index.stream(3, 2)
    victim = stream.unit(0)[0]
    entry = index.manifest.shards[index.samples.shard_of(victim)]
    tensors_at, tensors_bytes = index.samples.member(victim)[:2]
    data = bytearray((copy / entry.name).read_bytes())
    data[tensors_at + tensors_bytes - 40] ^= 0xFF  # tensor data, not its header: the bucket is still known
    (copy / entry.name).write_bytes(bytes(data))
    split = BatchSplit(2, 1, 0, 1)
    skip = MicroBatches(ShardIndex(copy, verify="sha256"), split, seed=3, start_position=0, steps=1, on_bad="skip")
    batch = skip[0]
    bucket = next(b for b in index.buckets() if victim in b.samples.tolist())
    assert batch["bad"][0]["key"] == index.key(victim) and index.key(victim) not in batch["keys"]
    members = bucket.samples.tolist()
    stand_in = members[(members.index(victim) + 1) % len(members)]
    assert batch["keys"] == [index.key(stand_in), index.key(stream.unit(0)[1])]
    assert batch["latent_mean"].shape[1:] == bucket.shape


# ------------------------------------------------------------------------------------------------ the pre-flight
def _overrides(model: Path, shards: Path, tmp_path: Path, *more: str) -> list[str]:
    return [f"model.path={model}", f"data.shards={shards}", f"output_dir={tmp_path / 'out'}", *more]


def test_the_preflight_counts_remainders_and_refuses_a_bucket_smaller_than_a_micro_batch(bucketed, tmp_path):
    model, shards = bucketed
    checks = preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path, "train.micro_batch_size=2")))
    assert checks.warnings == ["train.micro_batch_size 2: 2 of the 14 samples are left out of each epoch, a "
                               "different draw each epoch (a bucket's samples short of a whole micro-batch: 1 of 3 in "
                               "32x48, 1 frame, 1 of 7 in 32x48, 9 frames)"]
    assert preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path))).warnings == []
    with pytest.raises(CogvxError) as refused:
        preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path, "train.micro_batch_size=4")))
    message = str(refused.value)
    assert "\n" not in message and message == (
        "train.micro_batch_size 4: the 32x48, 1 frame bucket holds 3 sample(s), fewer than one micro-batch, so they "
        "could never be trained on; use micro_batch_size 3 or less, or prep more samples of that shape, or leave them "
        "out")


def test_mixtures_and_streaming_over_several_buckets_keep_micro_batch_one(bucketed, synthetic_shards, tmp_path):
    model, shards = bucketed
    _, one_bucket = synthetic_shards((3, 3, 2))
    mixture = ["data.shards=", "data.sources=[{shards: " + str(shards) + "}, {shards: " + str(one_bucket) + "}]"]
    streamed = [f"data.shards=pipe:cat {shards}/{{name}}", "data.streaming=true"]
    for more, what in ((mixture, "data.sources (a mixture) over 4 buckets"), (streamed, "data.streaming over 4 "
                                                                                         "buckets")):
        with pytest.raises(CogvxError) as refused:
            preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path, "train.micro_batch_size=2",
                                                              *more)))
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"train.micro_batch_size 2 with {what}"), message
        assert "not yet for" in message and message.endswith("use micro_batch_size 1 with grad_accum_steps for a "
                                                             "larger batch")
        preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path, *more)))  # micro-batch 1 mixes


def test_a_sample_whose_header_cannot_be_read_fails_or_is_left_out(bucketed, tmp_path):
    model, shards = bucketed
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = ShardIndex(copy)
    entry = index.manifest.shards[1]
    victim = index.samples.shard_indices(1)[0]
    tensors_at = index.samples.member(victim)[0]
    data = bytearray((copy / entry.name).read_bytes())
    data[tensors_at + 8:tensors_at + 24] = b"\x00not json at all"  # the same size: verify "size" passes
    (copy / entry.name).write_bytes(bytes(data))
    with pytest.raises(CogvxError, match=f"data.shards: shard {copy / entry.name}, sample {index.key(victim)}: its "
                                         "shape cannot be read .*so its bucket is unknown; .*data.on_bad_sample: skip"):
        preflight(load_config(RunConfig, None, _overrides(model, copy, tmp_path, "train.micro_batch_size=2")))
    checks = preflight(load_config(RunConfig, None, _overrides(model, copy, tmp_path, "train.micro_batch_size=2",
                                                               "data.on_bad_sample=skip")))
    assert "in no bucket and never read" in checks.warnings[0] and index.key(victim) in checks.warnings[0]
    assert victim not in {i for b in checks.index.buckets() for i in b.samples.tolist()}
    assert sum(len(b.samples) for b in checks.index.buckets()) == 13


# ------------------------------------------------------------------------------------------------ a token budget
BUDGET = 696
"""train.micro_batch_tokens of the tests: 3 stills of 232 tokens a micro-batch, 2 clips of 244 (text included)."""


def budget_keys(shards: Path, accum: int, dp: int, steps: int, micro: int = 1, start_step: int = 0,
                budget: int = BUDGET) -> dict[int, list[tuple[str, ...]]]:
    """step -> the keys of each micro-batch of that step over all ranks under a token budget, read for real, in the
    order of their units within the step (micro-step x ranks + rank)."""
    batches: dict[int, dict[int, tuple[str, ...]]] = {}
    for rank in range(dp):
        split = BatchSplit(micro, accum, rank, dp)
        reader = MicroBatches(ShardIndex(shards), split, 3, start_step * split.global_batch, steps,
                              micro_batch_tokens=budget)
        for micro_index in range(len(reader)):
            batch = reader[micro_index]
            assert batch["latent_mean"].shape[0] == len(batch["keys"])  # it stacked: one shape
            step, micro_step = divmod(micro_index, accum)
            batches.setdefault(start_step + step, {})[micro_step * dp + rank] = tuple(batch["keys"])
    return {step: [units[k] for k in sorted(units)] for step, units in batches.items()}


def test_a_token_budget_batches_each_bucket_by_its_tokens(bucketed):
    _, shards = bucketed
    names = bucket_of_keys(ShardIndex(shards))
    stream = ShardIndex(shards).stream(3, 1, BUDGET)
    assert isinstance(stream, BucketedStream) and stream.unit_sizes == [3, 2, 2]  # stills, landscape, portrait
    assert stream.units_per_epoch == 1 + 3 + 2 and stream.left_out == {"32x48, 1 frame": 0, "32x48, 9 frames": 1,
                                                                       "48x32, 9 frames": 0}
    steps = budget_keys(shards, accum=2, dp=2, steps=6)  # 4 units a step, every rank 2 micro-steps
    assert sorted(steps) == list(range(6)) and all(len(units) == 4 for units in steps.values())
    sizes = {"32x48, 1 frame": 3, "32x48, 9 frames": 2, "48x32, 9 frames": 2}
    for units in steps.values():
        for keys in units:
            assert len({names[key] for key in keys}) == 1 and len(set(keys)) == len(keys) == sizes[names[keys[0]]]
    every = [keys for units in steps.values() for keys in units]
    assert {len(keys) for keys in every} == {2, 3}  # micro-batches of different sizes, one bucket each
    assert sorted(every) == sorted(tuple(ShardIndex(shards).key(i) for i in stream.unit(k)) for k in range(24))
    epoch = [i for k in range(6) for i in stream.unit(k)]  # each sample at most once, a landscape one left out
    assert len(epoch) == len(set(epoch)) == 13
    budget_1 = ShardIndex(shards).stream(3, 1, 1)  # below one sample of any bucket: micro-batches of one
    assert budget_1.unit_sizes == [1, 1, 1] and budget_1.units_per_epoch == 14


def test_a_token_budget_keeps_the_order_for_any_rank_split_and_resume(bucketed):
    _, shards = bucketed
    two_ranks = budget_keys(shards, accum=2, dp=2, steps=6)
    assert budget_keys(shards, accum=4, dp=1, steps=6) == two_ranks  # the global batch kept: the same units
    assert budget_keys(shards, accum=1, dp=4, steps=6) == two_ranks
    assert budget_keys(shards, accum=2, dp=2, steps=3, start_step=3) == {s: two_ranks[s] for s in (3, 4, 5)}
    assert budget_keys(shards, accum=1, dp=2, steps=4, micro=2) == {  # positions count slots of micro_batch_size
        s: two_ranks[s // 2][(s % 2) * 2:(s % 2) * 2 + 2] for s in range(4)}


def test_no_budget_leaves_the_units_as_they_were(bucketed):
    _, shards = bucketed
    index = ShardIndex(shards)
    plain, sized = index.stream(3, 2), BucketedStream(index.buckets(), 2, 3, unit_sizes=[2, 2, 2])
    assert [plain.unit(k) for k in range(20)] == [sized.unit(k) for k in range(20)]
    split = BatchSplit(2, 2, 1, 2)
    off = MicroBatches(index, split, 3, 0, 4, micro_batch_tokens=0)
    assert [off.samples_of(j) for j in range(8)] == [MicroBatches(index, split, 3, 0, 4).samples_of(j)
                                                     for j in range(8)]
    assert [off.samples_of(j) for j in range(8)] == [plain.unit(split.unit(0, j)) for j in range(8)]


def test_a_token_budget_is_refused_in_one_line_where_it_cannot_work(bucketed, synthetic_shards, tmp_path):
    model, shards = bucketed
    _, one_bucket = synthetic_shards((3, 3, 2))
    mixture = ["data.shards=", "data.sources=[{shards: " + str(shards) + "}, {shards: " + str(one_bucket) + "}]"]
    streamed = [f"data.shards=pipe:cat {shards}/{{name}}", "data.streaming=true"]
    for more, what in ((mixture, "data.sources (a mixture)"), (streamed, "data.streaming")):
        with pytest.raises(CogvxError) as refused:
            load_config(RunConfig, None, _overrides(model, shards, tmp_path, f"train.micro_batch_tokens={BUDGET}",
                                                    *more)).validate()
        assert str(refused.value) == f"train.micro_batch_tokens needs one dataset read in exact order, not {what}"
    with pytest.raises(CogvxError, match="^train.micro_batch_tokens must be 0 .off. or positive, got -1$"):
        load_config(RunConfig, None, _overrides(model, shards, tmp_path, "train.micro_batch_tokens=-1")).validate()
    with pytest.raises(CogvxError) as refused:  # stills: 5 a micro-batch, but the bucket holds 3
        preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path, "train.micro_batch_tokens=1160")))
    assert str(refused.value) == (
        "train.micro_batch_tokens 1160: the 32x48, 1 frame bucket holds 3 sample(s), fewer than one micro-batch (5), "
        "so they could never be trained on; use micro_batch_tokens 927 or less, or prep more samples of that shape, "
        "or leave them out")
    checks = preflight(load_config(RunConfig, None, _overrides(model, shards, tmp_path,
                                                               f"train.micro_batch_tokens={BUDGET}")))
    assert checks.warnings == ["train.micro_batch_tokens 696: 1 of the 14 samples are left out of each epoch, a "
                               "different draw each epoch (a bucket's samples short of a whole micro-batch: 1 of 7 in "
                               "32x48, 9 frames)"]


def test_the_planner_plans_every_bucket_at_its_budgeted_micro_batch(bucketed):
    from cogvx_dist.train.ds_config import load_ds_config
    from cogvx_dist.train.memory.runs import peak_run, planned_batches, planned_run

    model, shards = bucketed
    manifest = Manifest.read(shards)
    info = describe_checkpoint(model)
    config = load_config(RunConfig, None, [f"model.path={model}", f"data.shards={shards}"])
    assert planned_batches(config, manifest) == [((9, 48, 32), 1)]  # no budget: the largest bucket at micro 1
    budgeted = load_config(RunConfig, None, [f"model.path={model}", f"data.shards={shards}",
                                             f"train.micro_batch_tokens={BUDGET}"])
    batches = planned_batches(budgeted, manifest)
    # Uncounted by prep, so every frame count x resolution listed is planned, at its own micro-batch.
    assert sorted(batches) == [((1, 32, 48), 3), ((1, 48, 32), 3), ((9, 32, 48), 2), ((9, 48, 32), 2)]
    ds = load_ds_config("zero2")
    needs = {(geometry, micro): planned_run(budgeted, info.family, info.transformer_config, geometry, ds, 1,
                                            micro).plan().needed for geometry, micro in batches}
    worst = peak_run(budgeted, info.family, info.transformer_config, manifest, ds, 1)
    assert worst.plan().needed == max(needs.values())
    assert worst.plan().needed > planned_run(config, info.family, info.transformer_config, (9, 48, 32), ds,
                                             1).plan().needed  # two clips a micro-batch need more than one
