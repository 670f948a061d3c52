"""The train-side reader at scale: a synthetic dataset of a million samples in 4,000 shards (tiny tensors), then
what one rank pays to start and how fast it reads, beside plain sequential WebDataset reading of the same shards.

    python benchmarks/bench_data.py                          # 1,000,000 samples, 4,000 shards (~2.3 GB on disk)
    python benchmarks/bench_data.py --samples 20000 --shards 80 --json r.json

Reported:
- manifest.json and index.safetensors sizes;
- rank start-up: a fresh process building the reader (manifest, index, every shard's size checked) and reading its
  first sample, in seconds, and the memory its index holds (arrays) and its resident-set growth;
- sustained samples/s of the ranged reader in training order (a random permutation over all shards: each sample
  one positioned read, decoded and checked for finite values) from local disk, and from an S3-compatible server on
  loopback (moto, over a subset of the shards);
- sustained samples/s of `webdataset.WebDataset` reading the shards sequentially, with the same decoding, from
  disk and from the same server (whole objects, through fsspec).
The shards are written with the real shard writer's pieces (encode_sample, sample digests, member offsets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"startup_s": 10.0, "index_mb": 200.0, "ranged_vs_webdataset": 0.5}
"""What the train-side reader is held to: start-up under 10 s, index under 200 MB a rank, ranged reads within 2x of
WebDataset (the last report: benchmarks/results/, docs/BENCHMARKS.md)."""


def write_shard(args: tuple[str, int, int, int]) -> dict:
    """One shard of `size` samples numbered from `first` (run in a worker process)."""
    import torch
    import webdataset as wds

    from cogvx_dist.core import shard_format

    folder, number, first, size = args
    path = Path(folder) / shard_format.shard_name(0, number)
    keys, digests = [], []
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for i in range(first, first + size):
            key = f"sample{i:07d}"
            value = torch.full((4, 1, 2, 2), float(i % 997))
            tensors = {shard_format.LATENT_MEAN: value, shard_format.LATENT_LOGVAR: value - 6,
                       shard_format.PROMPT_EMBEDS: torch.zeros(2, 4)}
            sample = shard_format.encode_sample(key, tensors, {"prompt": key})
            sink.write(sample)
            keys.append(key)
            digests.append(shard_format.sample_digest(sample))
    return {"name": path.name, "samples": size, "bytes": path.stat().st_size,
            "sha256": shard_format.file_sha256(path), "keys": keys, "digests": digests,
            "members": shard_format.member_rows(path, keys)}


def write_dataset(folder: Path, samples: int, shards: int, workers: int) -> float:
    """The dataset and its manifest; returns seconds taken."""
    from cogvx_dist.core import shard_format
    from cogvx_dist.core.families import get_family

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-samples // shards)
    jobs = [(str(folder), n, n * per_shard, min(per_shard, samples - n * per_shard)) for n in range(shards)
            if n * per_shard < samples]
    with ProcessPoolExecutor(workers) as pool:
        entries = [shard_format.ShardEntry(**e) for e in pool.map(write_shard, jobs, chunksize=8)]
    family = get_family("CogVideoX-2b")
    header = shard_format.manifest_header(family, "synthetic", vae_scaling_factor=family.vae_scaling_factor,
                                          latent_channels=4, text_embed_dim=4, frames=1, buckets=[(16, 16)],
                                          fps=8, storage_dtype="float32")
    shard_format.Manifest(**header, shards=entries).write(folder)
    return time.perf_counter() - started


STARTUP = """
import json, sys, time
started = time.perf_counter()
import psutil
from cogvx_dist.train.data.reader import SampleStream, ShardIndex
imported = time.perf_counter()
rss0 = psutil.Process().memory_info().rss
index = ShardIndex(sys.argv[1], verify="size")
stream = SampleStream(len(index), seed=0)
index.read(stream.sample_at(0))
done = time.perf_counter()
print(json.dumps({"startup_s": done - imported, "import_s": imported - started,
                  "index_mb": index.samples.nbytes / 1e6,
                  "rss_growth_mb": (psutil.Process().memory_info().rss - rss0) / 1e6}))
"""


def measure_startup(location: str, env: dict | None = None) -> dict:
    """Rank start-up in a fresh process (the file cache is warm: the dataset was just written)."""
    result = subprocess.run([sys.executable, "-c", STARTUP, location], capture_output=True, text=True, check=True,
                            cwd=REPO, env={**os.environ, **(env or {})})
    return json.loads(result.stdout.strip().splitlines()[-1])


def ranged_rate(location: str, count: int) -> float:
    """Samples/s of the exact-order reader over `count` positions of the training stream."""
    from cogvx_dist.train.data.reader import SampleStream, ShardIndex

    index = ShardIndex(location)
    stream = SampleStream(len(index), seed=0)
    started = time.perf_counter()
    for position in range(count):
        index.read(stream.sample_at(position))
    return count / (time.perf_counter() - started)


def webdataset_rate(urls: list[str], count: int) -> float:
    """Samples/s of plain sequential WebDataset reading, with the same decoding and checks."""
    import torch
    import webdataset as wds

    from cogvx_dist.core.shard_format import decode_sample

    started, seen = time.perf_counter(), 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        tensors, _ = decode_sample(sample)
        assert all(torch.isfinite(t).all() for t in tensors.values())
        seen += 1
        if seen == count:
            break
    return seen / (time.perf_counter() - started)


def s3_figures(folder: Path, shards: int, count: int) -> dict:
    """The ranged reader against moto's S3 server on loopback, over the first `shards` shards."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from cogvx_dist.core import shard_format
    from cogvx_dist.core.storage import Store

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    try:
        subset = folder.parent / "subset"
        manifest = shard_format.Manifest.read(folder)
        index = manifest.sample_index(Store(folder))
        manifest.shards = manifest.shards[:shards]
        for number, entry in enumerate(manifest.shards):
            indices = index.shard_indices(number)
            entry.keys = [index.key(i) for i in indices]
            entry.digests = [index.digest(i) for i in indices]
            entry.members = index.members[indices.start:indices.stop].tolist()
        subset.mkdir(exist_ok=True)
        manifest.write(subset)
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        started = time.perf_counter()
        for name in [e.name for e in manifest.shards] + [shard_format.INDEX_NAME, shard_format.MANIFEST_NAME]:
            client.upload_file(str((subset if name.endswith((".json", ".safetensors")) else folder) / name),
                               "bench", f"set/{name}")
        upload_s = time.perf_counter() - started
        reads = min(count, manifest.num_samples)
        # WebDataset reads s3:// through a gopen scheme handler: here fsspec's sequential whole-object reads
        import importlib

        import fsspec

        schemes = importlib.import_module("webdataset.gopen").gopen_schemes
        s3 = fsspec.filesystem("s3")
        schemes["s3"] = lambda url, mode="rb", bufsize=8192, **_: s3.open(url, mode, block_size=16 << 20)
        urls = [f"s3://bench/set/{entry.name}" for entry in manifest.shards]
        return {"shards": shards, "samples": manifest.num_samples, "upload_s": round(upload_s, 2),
                "startup": measure_startup("s3://bench/set", env),
                "ranged_samples_per_s": round(ranged_rate("s3://bench/set", reads), 1),
                "webdataset_samples_per_s": round(webdataset_rate(urls, reads), 1)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4000)
    parser.add_argument("--read", type=int, default=20000, help="samples each reader reads for its rate")
    parser.add_argument("--s3-shards", type=int, default=40, help="shards uploaded to the S3 server (0: skip)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", help="folder for the dataset (default: a new temporary one)")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()

    from cogvx_dist.core import shard_format

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    folder = work / "set"
    report: dict = {"samples": args.samples, "shards": args.shards, "cpus": os.cpu_count()}
    if not (folder / shard_format.MANIFEST_NAME).is_file():
        report["write_s"] = round(write_dataset(folder, args.samples, args.shards, args.workers), 1)
    report["dataset_bytes"] = sum(p.stat().st_size for p in folder.glob("shard-*.tar"))
    report["manifest_bytes"] = (folder / shard_format.MANIFEST_NAME).stat().st_size
    report["index_bytes"] = (folder / shard_format.INDEX_NAME).stat().st_size
    report["startup"] = measure_startup(str(folder))
    report["ranged_samples_per_s"] = round(ranged_rate(str(folder), args.read), 1)
    urls = [str(folder / shard_format.shard_name(0, n)) for n in range(args.shards)]
    report["webdataset_samples_per_s"] = round(webdataset_rate(urls, args.read), 1)
    report["ranged_vs_webdataset"] = round(report["ranged_samples_per_s"] / report["webdataset_samples_per_s"], 3)
    if args.s3_shards:
        report["s3"] = s3_figures(folder, args.s3_shards, args.read)
    report["targets"] = TARGETS
    report["meets_targets"] = (report["startup"]["startup_s"] < TARGETS["startup_s"]
                               and report["startup"]["index_mb"] < TARGETS["index_mb"]
                               and report["ranged_vs_webdataset"] >= TARGETS["ranged_vs_webdataset"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
