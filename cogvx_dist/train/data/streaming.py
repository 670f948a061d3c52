"""Streaming mode: shards read in order over http(s) or a `pipe:` command with WebDataset.

`data.shards` is then a dataset location: an http(s) URL of the folder `cogvx prep` wrote, or a `pipe:` command
template with `{name}` where the file name goes (e.g. `pipe:aws s3 cp s3://bucket/set/{name} -`). Each rank draws
shards with replacement from a seed of (run seed, rank, start step), so every rank has an endless stream and runs
the same number of steps. Resuming is approximate: the resumed run sees a fresh draw, not the exact next samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.shard_format import MANIFEST_NAME, Manifest, decode_sample
from cogvx_dist.train.data.reader import collate

REMOTE_PREFIXES = ("http://", "https://", "pipe:")


def is_remote(location: str) -> bool:
    """True for locations read in streaming mode."""
    return location.startswith(REMOTE_PREFIXES)


def member_url(location: str, name: str) -> str:
    """URL of file `name` (manifest or shard) of a remote dataset."""
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise CogvxError(f"data.shards {location!r}: a pipe: location needs a {{name}} placeholder")
        return location.replace("{name}", name)
    return location.rstrip("/") + "/" + name


def read_remote_manifest(location: str) -> Manifest:
    """Fetch and validate the manifest of a remote dataset."""
    import webdataset as wds

    url = member_url(location, MANIFEST_NAME)
    try:
        with wds.gopen(url) as stream:
            text = stream.read().decode()
    except Exception as err:  # curl/pipe failures surface as various OSErrors
        raise CogvxError(f"data.shards: cannot read {url}: {first_line(err)}") from err
    if not text:
        raise CogvxError(f"data.shards: {url} is empty or could not be fetched")
    return Manifest.parse(text, where=url)


class StreamingMicroBatches(IterableDataset):
    """An endless stream of this rank's micro-batches drawn from remote shards."""

    def __init__(self, location: str, manifest: Manifest, micro_batch_size: int, seed: int, rank: int,
                 start_step: int, shuffle_buffer: int = 64) -> None:
        self.urls = [member_url(location, shard.name) for shard in manifest.shards]
        self.micro_batch_size = micro_batch_size
        self.seed = seed * 1_000_003 + rank * 10_007 + start_step
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import random

        import webdataset as wds
        from torch.utils.data import get_worker_info

        # Each loader worker draws its own stream: the loader takes micro-batches from the workers in turn, so
        # workers with one seed would hand it every micro-batch once per worker.
        worker = get_worker_info()
        seed = self.seed * 1_009 + (worker.id if worker is not None else 0)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, rng=random.Random(seed)),
        )
        pending: list[tuple[dict[str, Any], str]] = []
        for sample in pipeline:
            tensors, _ = decode_sample(sample)
            pending.append((tensors, sample["__key__"]))
            if len(pending) == self.micro_batch_size:
                yield collate([t for t, _ in pending], [k for _, k in pending])
                pending = []
