"""Datasets read from object storage and HTTP with ranged reads, the sample index, and old manifests."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.sample_index import INDEX_NAME
from cogvx_dist.core.storage import Store
from cogvx_dist.train.data.reader import BadSample, ShardIndex
from tests.helpers import assert_one_line_error, cli, http_server, s3_server, upload, write_config


def _every_sample(index: ShardIndex) -> list[tuple[str, dict[str, torch.Tensor], dict]]:
    return [(index.key(i), *index.read(i)) for i in range(len(index))]


def _same_samples(a: list, b: list) -> None:
    assert [row[0] for row in a] == [row[0] for row in b]
    for (_, tensors_a, meta_a), (_, tensors_b, meta_b) in zip(a, b):
        assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a)


def as_version_1(folder, into):
    """A copy of a dataset as older cogvx wrote it: keys and digests listed in manifest.json, no index file."""
    shutil.copytree(folder, into)
    manifest = shard_format.Manifest.read(into)
    index = manifest.sample_index(Store(into))
    data = json.loads((into / shard_format.MANIFEST_NAME).read_text())
    for number, shard in enumerate(data["shards"]):
        indices = index.shard_indices(number)
        shard["keys"] = [index.key(i) for i in indices]
        shard["digests"] = [index.digest(i) for i in indices]
    data["format_version"] = 1
    del data["index"]
    (into / shard_format.MANIFEST_NAME).write_text(json.dumps(data))
    (into / INDEX_NAME).unlink()
    return into


def test_ranged_reads_over_http_and_s3_give_the_local_samples(synthetic_shards, tmp_path, monkeypatch):
    _, folder = synthetic_shards([3, 2])
    local = _every_sample(ShardIndex(folder, verify="sha256"))
    with http_server(folder) as url:
        over_http = ShardIndex(url, verify="sha256")
        assert over_http.store.remote and not over_http.damaged
        _same_samples(local, _every_sample(over_http))
    with s3_server(monkeypatch) as env:
        upload(folder, "s3://data/set", env)
        over_s3 = ShardIndex("s3://data/set", verify="sha256")
        _same_samples(local, _every_sample(over_s3))
        # a sample that cannot be fetched any more is a bad sample (the bad-sample policy decides), naming it
        import boto3

        boto3.client("s3").delete_object(Bucket="data", Key=f"set/{over_s3.shard_of(0)}")
        over_s3.store.retries = 0
        with pytest.raises(BadSample, match=f"{over_s3.key(0)}: cannot be fetched .*does not exist"):
            over_s3.read(0)


def test_version_1_manifests_still_read_by_scanning_tar_headers(synthetic_shards, tmp_path):
    _, folder = synthetic_shards([3, 2])
    old = as_version_1(folder, tmp_path / "v1")
    index = ShardIndex(old, verify="sha256")
    assert not index.samples.has_offsets(0)
    _same_samples(_every_sample(ShardIndex(folder)), _every_sample(index))
    assert index.samples.has_offsets(0) and index.samples.has_offsets(1)
    with http_server(old) as url:  # over HTTP the scan reads the tar headers with ranged reads
        _same_samples(_every_sample(ShardIndex(folder)), _every_sample(ShardIndex(url)))


@pytest.mark.slow
def test_an_old_manifest_trains(synthetic_shards, tmp_path, capsys):
    model, folder = synthetic_shards([3, 2])
    old = as_version_1(folder, tmp_path / "v1")
    config = write_config(tmp_path / "run.yaml", model, old, tmp_path / "out", train={"max_steps": 2})
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "1")
    assert code == 0, err


def test_a_damaged_index_is_one_line_naming_it(synthetic_shards, tmp_path):
    _, folder = synthetic_shards([3, 2])
    copy = tmp_path / "set"
    shutil.copytree(folder, copy)
    data = bytearray((copy / INDEX_NAME).read_bytes())
    data[-1] ^= 0xFF
    (copy / INDEX_NAME).write_bytes(bytes(data))
    with pytest.raises(CogvxError, match=f"{INDEX_NAME}: .*do not match the manifest"):
        ShardIndex(copy)


@pytest.mark.parametrize("location, message", [
    ("s3://no-such-bucket/set", "no shard manifest: s3://no-such-bucket/set/manifest.json does not exist"),
    ("http://127.0.0.1:{closed}/set", "http://127.0.0.1:{closed}/set/manifest.json: unreachable after"),
    ("s3://data/set", "s3://data/set/manifest.json: no credentials found"),
])
def test_bad_urls_unreachable_stores_and_missing_credentials_are_one_line(synthetic_shards, tmp_path, capsys,
                                                                          monkeypatch, location, message):
    from tests.helpers import free_port

    model, _ = synthetic_shards([3, 2])
    closed = free_port()
    location, message = location.format(closed=closed), message.format(closed=closed)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup on this machine
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws profile either
    with s3_server(monkeypatch):
        if "credentials" in message:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                monkeypatch.delenv(name)
        config = write_config(tmp_path / "run.yaml", model, tmp_path, tmp_path / "out")
        code, _, err = cli(capsys, "train", "--config", str(config), f"data.shards={location}")
    assert_one_line_error(code, err, message)


def test_credentials_in_storage_options_are_refused(synthetic_shards, tmp_path, capsys):
    model, folder = synthetic_shards([3, 2])
    config = write_config(tmp_path / "run.yaml", model, folder, tmp_path / "out")
    code, _, err = cli(capsys, "train", "--config", str(config), "data.storage_options.secret=abc")
    assert_one_line_error(code, err, "data.storage_options.secret: credentials do not go in the config")


@pytest.mark.parametrize("key", ["aws_secret_access_key", "aws_session_token"])
def test_credentials_nested_in_storage_options_are_refused_and_never_reach_the_run_folder(synthetic_shards, tmp_path,
                                                                                           capsys, key):
    """s3fs hands `client_kwargs` on to boto, so a secret one level down is as much a credential as one at the top
    (the pre-flight used to check only the top level and wrote the secret to run_config.json)."""
    model, folder = synthetic_shards([3, 2])
    config = write_config(tmp_path / "run.yaml", model, folder, tmp_path / "out",
                          data={"storage_options": {"anon": False, "client_kwargs": {"region_name": "x", key: "abc"}}})
    code, _, err = cli(capsys, "train", "--config", str(config))
    assert_one_line_error(code, err, f"data.storage_options.client_kwargs.{key}: credentials do not go in the config")
    assert not (tmp_path / "out").exists()


def test_prep_refuses_an_http_output(synthetic_shards, tmp_path, capsys):
    model, folder = synthetic_shards([3, 2])
    code, _, err = cli(capsys, "prep", "--model", str(model), "--data", str(folder), "--out", "https://host/set")
    assert_one_line_error(code, err, "out https://host/set: http(s) URLs cannot be written")


def test_the_index_file_is_the_same_bytes_in_every_process(synthetic_shards):
    import subprocess
    import sys

    from tests.helpers import REPO

    _, folder = synthetic_shards([3, 2])
    script = ("import hashlib, sys; from cogvx_dist.core.shard_format import Manifest; "
              "from cogvx_dist.core.storage import Store; m = Manifest.read(sys.argv[1]); "
              "print(hashlib.sha256(m.sample_index(Store(sys.argv[1])).to_bytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(6)}
    assert len(digests) == 1  # safetensors keeps metadata in a per-process hash map: the header is written sorted
