"""Prep to and from object storage: inputs listed by URL, shards and manifest written to a bucket (moto's real S3
server on loopback), resume from what the bucket holds, and an upload killed part-way."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.faults import EXIT_CODES, FAULT_ENV
from cogvx_dist.core.synthetic_videos import make_synthetic_dataset
from cogvx_dist.train.data.reader import ShardIndex
from tests.helpers import REPO, clean_env, run_cli, s3_server, upload

pytestmark = pytest.mark.slow


def _by_clip(index: ShardIndex) -> dict[str, dict[str, torch.Tensor]]:
    """Samples by their video's file name (sources are relative paths locally, URLs from the bucket)."""
    samples = [index.read(i) for i in range(len(index))]
    return {meta["source"].rsplit("/", 1)[-1]: tensors for tensors, meta in samples}


def _objects(bucket: str) -> list[str]:
    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture
def bucket_inputs(tmp_path, monkeypatch):
    """8 clips uploaded to s3://inputs/clips/ and a JSONL list naming them by URL; yields (list, env)."""
    dataset = make_synthetic_dataset(tmp_path / "videos", count=8, seed=0)
    with s3_server(monkeypatch) as env:
        upload(dataset.root, "s3://inputs/clips", env)
        listing = tmp_path / "inputs.jsonl"
        listing.write_text("".join(json.dumps({"video": f"s3://inputs/clips/{source}",
                                               "prompt": dataset.prompts[source]}) + "\n"
                                   for source in dataset.good)
                           + json.dumps({"video": "s3://inputs/clips/gone.mp4", "prompt": "a clip never uploaded"})
                           + "\n")
        boto3.client("s3").create_bucket(Bucket="out")
        yield listing, env


def test_prep_reads_urls_writes_a_bucket_and_resumes_from_it(bucket_inputs, prepped_2b, tiny_checkpoint, tmp_path):
    listing, env = bucket_inputs
    model, local_shards = prepped_2b
    args = ["prep", "--model", str(model), "--data", str(listing), "--out", "s3://out/set", "--stage",
            str(tmp_path / "stage"), "--storage-dtype", "float32", "--shard-samples", "3", "--no-progress",
            "--max-failed-fraction", "0.2"]
    crashed = run_cli(*args, env={**clean_env(), **env, FAULT_ENV: "prep.written=5"})
    assert crashed.returncode == EXIT_CODES["prep.written"], crashed.stderr[-2000:]
    assert _objects("out") == ["set/empty_prompt.safetensors", "set/parts/rank-00000.json",
                               "set/shard-r00000-000000.tar"]  # one whole shard
    resumed = run_cli(*args, env={**clean_env(), **env})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3 of 9 inputs of rank 0 are already in complete shards" in resumed.stderr
    assert _objects("out") == ["set/empty_prompt.safetensors", "set/errors.jsonl", "set/index.safetensors",
                               "set/manifest.json",
                               "set/parts/errors-r00000.jsonl", "set/parts/rank-00000.json",
                               "set/shard-r00000-000000.tar", "set/shard-r00000-000001.tar",
                               "set/shard-r00000-000002.tar"]
    assert not list((tmp_path / "stage").glob("shard-*.tar")), "uploaded shards are not kept in the stage"
    errors = boto3.client("s3").get_object(Bucket="out", Key="set/errors.jsonl")["Body"].read().decode()
    assert "gone.mp4" in errors and "cannot fetch" in errors and "does not exist" in errors
    # The bucket's dataset holds what local prep makes of the same clips, sample for sample.
    from_bucket, local = _by_clip(ShardIndex("s3://out/set", verify="sha256")), _by_clip(ShardIndex(local_shards))
    assert from_bucket.keys() == local.keys() and len(from_bucket) == 8
    for clip, tensors in local.items():
        assert all(torch.equal(tensors[name], from_bucket[clip][name]) for name in tensors), clip


def test_an_upload_killed_part_way_leaves_no_object_under_the_shard_name(tmp_path, monkeypatch):
    stage = tmp_path / "stage"
    stage.mkdir()
    name = shard_format.shard_name(0, 0)
    (stage / name).write_bytes(bytes(range(256)) * (12 << 12))  # 12 MiB: three parts of 5 MiB
    with s3_server(monkeypatch) as env:
        boto3.client("s3").create_bucket(Bucket="out")
        script = ("import sys; from pathlib import Path; from data_prep.publish import Publisher; "
                  f"Publisher('s3://out/set', Path(sys.argv[1]), part_bytes=5 << 20).shard({name!r})")
        killed = subprocess.run([sys.executable, "-c", script, str(stage)], cwd=REPO, capture_output=True, text=True,
                                env={**clean_env(), **env, FAULT_ENV: f"prep.uploaded_bytes={6 << 20}"}, timeout=120)
        assert killed.returncode == EXIT_CODES["prep.uploaded_bytes"], killed.stderr[-2000:]
        assert _objects("out") == []
        uploads = boto3.client("s3").list_multipart_uploads(Bucket="out").get("Uploads", [])
        assert [u["Key"] for u in uploads] == [f"set/{name}"], "the upload had started: one part was sent"
        assert (stage / name).is_file(), "the staged shard stays for the next attempt"
        done = subprocess.run([sys.executable, "-c", script, str(stage)], cwd=REPO, capture_output=True, text=True,
                              env={**clean_env(), **env}, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert _objects("out") == [f"set/{name}"]
        body = boto3.client("s3").get_object(Bucket="out", Key=f"set/{name}")["Body"].read()
        assert body == bytes(range(256)) * (12 << 12)
