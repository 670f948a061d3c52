"""Dataset mixtures: exact quotas per round, per-source streams, determinism, counting, config errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.train.data.mixture import ROUND, MixedIndex, MixtureStream, quotas
from cogvx_dist.train.data.reader import ShardIndex
from tests.helpers import assert_one_line_error, cli, write_config


def test_quotas_split_a_round_by_largest_remainder():
    assert quotas([3, 1]) == [750, 250]
    assert quotas([1, 1, 1]) == [334, 333, 333] and sum(quotas([0.2, 0.7, 0.1])) == ROUND
    with pytest.raises(CogvxError, match=r"data.sources\[1\].weight 0.0001 is too small"):
        quotas([1, 0.0001])


def test_weights_3_to_1_hold_over_400_samples_and_the_order_is_the_seeds():
    stream = MixtureStream([40, 25], [3, 1], seed=7)
    sources = [stream.source_at(p)[0] for p in range(400)]
    counts = Counter(sources)
    assert abs(counts[0] - 300) <= 3 * math.sqrt(400 * 0.75 * 0.25), counts  # within binomial noise (3 sigma)
    assert stream.seen(400) == [counts[0], counts[1]]
    again = MixtureStream([40, 25], [3, 1], seed=7)
    assert [again.sample_at(p) for p in range(400)] == [stream.sample_at(p) for p in range(400)]
    other = MixtureStream([40, 25], [3, 1], seed=8)
    assert [other.sample_at(p) for p in range(400)] != [stream.sample_at(p) for p in range(400)]
    partial = Counter(stream.source_at(p)[0] for p in range(5 * ROUND, 5 * ROUND + 10))
    assert stream.seen(5 * ROUND + 10) == [5 * 750 + partial[0], 5 * 250 + partial[1]]


def test_each_source_reads_its_own_stream_in_order_with_its_own_epochs():
    sizes = [40, 25]
    stream = MixtureStream(sizes, [3, 1], seed=1)
    visited: dict[int, list[int]] = {0: [], 1: []}
    for position in range(3 * ROUND):
        source, local = stream.source_at(position)
        visited[source].append(local)
    assert visited[0] == list(range(len(visited[0]))) and visited[1] == list(range(len(visited[1])))
    assert (len(visited[0]), len(visited[1])) == (3 * 750, 3 * 250)  # exact over whole rounds
    samples = [stream.sample_at(p) for p in range(3 * ROUND)]
    first_epoch_of_1 = [s for p, s in enumerate(samples) if stream.source_at(p)[0] == 1][:25]
    assert sorted(first_epoch_of_1) == list(range(40, 65))  # source 1's indices follow source 0's, each once
    assert stream.seen(3 * ROUND) == [3 * 750, 3 * 250]


def test_a_mixed_index_reads_each_source(synthetic_shards):
    _, first = synthetic_shards([3, 2])
    _, second = synthetic_shards([4])
    one, two = ShardIndex(first), ShardIndex(second)
    mixed = MixedIndex([one, two], ["a", "b"], [3, 1])
    assert len(mixed) == 9
    assert mixed.key(0) == one.key(0) and mixed.key(5) == two.key(0) and mixed.key(8) == two.key(3)
    assert mixed.shard_of(5) == two.store.url(two.shard_of(0))
    assert mixed.seen(ROUND, seed=0) == {"samples_seen/a": 750, "samples_seen/b": 250}


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[{shards: /x}]"], "data.shards and data.sources exclude each other"),
    (["data.shards=", "data.sources=[{shards: /x, weight: 0}]"], "data.sources[0].weight must be positive"),
    (["data.shards=", "data.sources=[{shards: /x/a}, {shards: /y/a}]"], "two sources are named 'a'"),
    (["data.shards=", "data.sources=[{weight: 2}]"], "data.sources[0].shards is required"),
    (["data.shards=", "data.sources=[{shards: /x, wieght: 2}]"], "unknown config key data.sources[0].wieght"),
])
def test_mixture_config_errors_are_one_line(synthetic_shards, tmp_path, capsys, overrides, message):
    model, folder = synthetic_shards([3, 2])
    config = write_config(tmp_path / "run.yaml", model, folder, tmp_path / "out")
    code, _, err = cli(capsys, "train", "--config", str(config), *overrides)
    assert_one_line_error(code, err, message)


def test_sources_of_different_clip_lengths_mix_as_frame_buckets(tiny_checkpoint, tmp_path):
    """Two datasets prepped at 17 and 9 frames (or with frame buckets) mix: the mixture lists both frame counts, so
    each sample's latent shape names its bucket, and plans its longest clip; it once refused 'one clip length'."""
    from cogvx_dist.core.shard_format import Manifest
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards
    from cogvx_dist.train.data.mixture import combined_manifest
    from cogvx_dist.train.data.reader import bucket_names

    model = tiny_checkpoint("CogVideoX-2b")
    short = write_synthetic_shards(tmp_path / "short", model, [2], geometries=[(9, 32, 48)])
    long = write_synthetic_shards(tmp_path / "long", model, [2], geometries=[(17, 32, 48), (17, 48, 32)])
    mixed = combined_manifest([short, long])
    assert (mixed.frames, mixed.all_frame_counts(), mixed.sizes()) == (17, [17, 9], [(32, 48), (48, 32)])
    assert mixed.num_samples == 4 and mixed.bucket_samples() is None  # one source's counts are not the mixture's
    names = set(bucket_names(mixed).values())
    assert {"32x48, 9 frames", "32x48, 17 frames", "48x32, 17 frames"} <= names
    index = MixedIndex([ShardIndex(tmp_path / "short"), ShardIndex(tmp_path / "long")], ["s", "l"], [1, 1])
    shapes = {tuple(index.read(i)[0]["latent_mean"].shape[1:]) for i in range(len(index))}
    assert shapes == {(3, 4, 6), (5, 4, 6), (5, 6, 4)}
    assert Manifest.read(tmp_path / "short").frames == 9  # the sources themselves are unchanged
