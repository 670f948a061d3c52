"""Prep tier in one process: inputs, decoding, encoding, shards, manifest, resume, errors, inspect/verify.

Real mp4 files (synthetic moving shapes and broken files), the tiny checkpoints, real tar shards.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.caption_layouts import LAYOUTS, describe_layouts, layout_choices
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.storage import Store
from cogvx_dist.core.synthetic_videos import WRITERS, make_synthetic_dataset, render_clip, write_mp4
from data_prep.config import PrepConfig
from data_prep.decode import BadInput, choose_bucket, decode_video, frame_indices, to_model_input
from data_prep.inputs import READERS, read_records
from data_prep.job import run_prep
from data_prep.ranks import discover_ranks, under_mpi
from data_prep.shards import verify
from tests.helpers import assert_one_line_error, cli, run_cli, shard_keys

EXPECTED_REASON = {
    "truncated": "unreadable video",
    "random_bytes": "unreadable video",
    "empty": "empty file (0 bytes)",
    "too_short": "too short",
    "missing": "missing file",
    "empty_prompt": "empty prompt",
}


def _config(model: Path, data: Path, out: Path, **kw) -> PrepConfig:
    base = dict(model=str(model), data=str(data), out=str(out), storage_dtype="float32", progress=False,
                shard_max_samples=3, decode_workers=2, max_failed_fraction=0.5)
    base.update(kw)
    return PrepConfig(**base)


def _read_shards(out: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Every sample of a shard folder, read with plain webdataset (no decoding of members)."""
    import webdataset as wds

    manifest = shard_format.Manifest.read(out)
    samples: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
    keys = []
    for entry in manifest.shards:
        for sample in wds.WebDataset(str(out / entry.name), shardshuffle=False, empty_check=False):
            keys.append(sample["__key__"])
            samples[sample["__key__"]] = shard_format.decode_sample(sample)
    assert len(keys) == len(set(keys)), "a sample was written twice"
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root / "csvset", count=7, frames=14, height=48, width=64, fps=8, seed=1,
                                  layout="csv", broken=True)


@pytest.fixture(scope="module")
def prepped(tiny_checkpoint, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "shards"
    result = run_prep(_config(tiny_checkpoint("CogVideoX-2b"), dataset.data, out))
    return out, result


# ----------------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_caption_layout_has_a_reader_and_a_writer(layout):
    """A row of the layout table is read by prep and written by the synthetic datasets the tests use."""
    assert layout in READERS, f"caption layout {layout!r} has no reader in data_prep/inputs.py READERS"
    assert layout in WRITERS, f"caption layout {layout!r} has no writer in cogvx_dist/core/synthetic_videos.py WRITERS"


def test_readers_and_writers_are_only_for_layouts_of_the_table():
    assert set(READERS) - set(LAYOUTS) == set(), "a reader for a layout the table does not list"
    assert set(WRITERS) - set(LAYOUTS) == set(), "a writer for a layout the table does not list"


def test_the_layout_table_describes_its_files_and_ends_with_the_fallback():
    """Auto detection reads a folder in the first layout whose files it holds: a layout without files matches any
    folder, so only the last may have none; every file and suffix a layout is known by is in its description."""
    assert [name for name, layout in LAYOUTS.items() if not layout.files] == [list(LAYOUTS)[-1]]
    for name, layout in LAYOUTS.items():
        for word in (*layout.files, *layout.suffixes):
            assert word in layout.description, f"{name}: {word} is not in its description"


def test_config_cli_and_reader_offer_exactly_the_tables_layouts(tmp_path, capsys):
    assert layout_choices() == ("auto", *LAYOUTS)
    for name in layout_choices():
        PrepConfig(model="m", data="d", out="o", layout=name).check_basic()
    expected = f"layout must be one of {', '.join(layout_choices())}, not 'bogus'"
    with pytest.raises(CogvxError, match=f"^{re.escape(expected)}$"):
        PrepConfig(model="m", data="d", out="o", layout="bogus").check_basic()
    with pytest.raises(CogvxError, match=f"^{re.escape(expected)}$"):
        read_records(tmp_path, "bogus")
    with pytest.raises(SystemExit):
        cli(capsys, "prep", "--model", "m", "--data", "d", "--out", "o", "--layout", "bogus")
    # Quoted or not depending on the Python version.
    assert f"choose from {', '.join(layout_choices())}" in capsys.readouterr().err.replace("'", "")
    with pytest.raises(SystemExit):
        cli(capsys, "prep", "--help")
    assert describe_layouts() in " ".join(capsys.readouterr().out.split())


def test_auto_detection_order_and_file_suffixes(tmp_path):
    """Auto detection keeps its precedence: CogVideo lists over a metadata file, JSONL over CSV."""
    from data_prep.inputs import detect_layout

    (tmp_path / "metadata.csv").write_text("video,prompt\n")
    assert detect_layout(tmp_path) == "csv"
    (tmp_path / "metadata.jsonl").write_text("")
    assert detect_layout(tmp_path) == "jsonl"
    (tmp_path / "prompt.txt").write_text("")
    assert detect_layout(tmp_path) == "cogvideo"
    assert detect_layout(tmp_path / "metadata.csv") == "csv"
    (tmp_path / "list.json").write_text("")
    assert detect_layout(tmp_path / "list.json") == "jsonl"
    with pytest.raises(CogvxError, match=r"prompt\.txt: a dataset file must be \.jsonl, \.json or \.csv$"):
        detect_layout(tmp_path / "prompt.txt")
    (tmp_path / "empty").mkdir()
    assert detect_layout(tmp_path / "empty") == "folder"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_lists_good_and_bad_inputs(tmp_path, layout):
    ds = make_synthetic_dataset(tmp_path / layout, count=2, frames=10, height=32, width=48, layout=layout,
                                broken=True)
    root, records = read_records(ds.data)
    assert root == ds.root
    assert {r.source for r in records} == set(ds.good) | set(ds.bad)
    for record in records:
        assert record.prompt == ds.prompts[record.source]
        assert (record.problem == "empty prompt") == (ds.bad.get(record.source) == "empty_prompt")
    assert len({r.key for r in records}) == len(records)


def test_malformed_lines_name_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"video": "a.mp4", "prompt": "x"}\n{"video": "b.mp4"}\n{oops\n')
    with pytest.raises(CogvxError, match=r"metadata\.jsonl:3: not valid JSON"):
        read_records(tmp_path / "metadata.jsonl")
    (tmp_path / "m.csv").write_text("video,prompt\na.mp4,one\n,two\n")
    with pytest.raises(CogvxError, match=r"m\.csv:3: empty 'video' cell"):
        read_records(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("clip,prompt\na.mp4,one\n")
    with pytest.raises(CogvxError, match=r"n\.csv:1: no 'video' column"):
        read_records(tmp_path / "n.csv")
    cog = tmp_path / "cog"
    cog.mkdir()
    (cog / "videos.txt").write_text("a.mp4\nb.mp4\n")
    (cog / "prompts.txt").write_text("one\n")
    with pytest.raises(CogvxError, match=r"prompts\.txt has 1 lines but .*videos\.txt has 2"):
        read_records(cog)
    (cog / "prompts.txt").write_text("one\ntwo\n")
    (cog / "videos.txt").write_text("a.mp4\n\nc.mp4\n")
    (cog / "prompts.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(CogvxError, match=r"videos\.txt:2: empty line"):
        read_records(cog)


def test_non_utf8_metadata_names_file_and_line(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"video,prompt\r\na.mp4,one\r\nb.mp4,caf\xe9\r\n")
    with pytest.raises(CogvxError, match=r"m\.csv:3: not valid UTF-8$"):
        read_records(tmp_path / "m.csv")
    (tmp_path / "h.csv").write_bytes(b"vid\xe9o,prompt\na.mp4,one\n")
    with pytest.raises(CogvxError, match=r"h\.csv:1: not valid UTF-8$"):
        read_records(tmp_path / "h.csv")
    (tmp_path / "m.jsonl").write_bytes(b'{"video": "a.mp4", "prompt": "x"}\n{"video": "b.mp4", "prompt": "\xff"}\n')
    with pytest.raises(CogvxError, match=r"m\.jsonl:2: not valid UTF-8$"):
        read_records(tmp_path / "m.jsonl")
    # Valid UTF-8 with CRLF line ends and a quoted multi-line prompt still reads as before.
    (tmp_path / "ok.csv").write_bytes('video,prompt\r\na.mp4,"caf\u00e9\r\nau lait"\r\n'.encode())
    _, records = read_records(tmp_path / "ok.csv")
    assert [(r.video, r.prompt, r.origin) for r in records] == [("a.mp4", "caf\u00e9\r\nau lait", "ok.csv:3")]


def test_repeated_video_gets_distinct_stable_keys(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"video": "a.mp4", "prompt": "x"}\n{"video": "a.mp4", "prompt": "y"}\n')
    _, records = read_records(tmp_path / "m.jsonl")
    assert [r.source for r in records] == ["a.mp4", "a.mp4#2"]
    assert records[0].key == shard_format.sample_key("a.mp4") != records[1].key


# ----------------------------------------------------------------------------------------------------------- decode
def test_stride_and_fps_select_the_same_frames(tmp_path):
    # Each frame gets a distinct brightness so the selected indices can be read back from the pixels.
    frames = np.stack([np.full((32, 48, 3), 10 * i + 5, np.uint8) for i in range(20)])
    path = write_mp4(tmp_path / "ramp.mp4", frames, fps=8)
    every = decode_video(path, 20, [(32, 48)], stride=1).frames
    levels = every.reshape(20, -1).mean(1)
    assert np.all(np.diff(levels) > 5), "frames decode in order and distinct"
    by_stride = decode_video(path, 9, [(32, 48)], stride=2)
    by_fps = decode_video(path, 9, [(32, 48)], target_fps=4)
    np.testing.assert_array_equal(by_stride.frames, every[0:17:2])
    np.testing.assert_array_equal(by_fps.frames, by_stride.frames)
    assert by_fps.fps == pytest.approx(4.0) and by_fps.source_fps == pytest.approx(8.0)
    with pytest.raises(BadInput, match="too short: 20 decodable frames, need 21"):
        decode_video(path, 11, [(32, 48)], stride=2)
    assert frame_indices(3, 30.0, 8.0, None)[0] == [0, 4, 8]


def test_bucket_choice_resize_crop_and_range(tmp_path):
    assert choose_bucket(480, 720, [(480, 720), (720, 480)]) == (480, 720)
    assert choose_bucket(1080, 720, [(480, 720), (720, 480)]) == (720, 480)
    # A portrait clip with a white center column: after resize + center crop to 48x32 the column stays centered.
    clip = np.zeros((9, 96, 48, 3), np.uint8)
    clip[:, :, 16:32] = 255
    path = write_mp4(tmp_path / "portrait.mp4", clip, fps=8)
    out = decode_video(path, 9, [(32, 48), (48, 32)], stride=1)
    assert out.frames.shape == (9, 48, 32, 3) and out.source_size == (96, 48)
    col = out.frames[0, 24, :, 0].astype(int)
    assert col[16] > 200 and col[2] < 50 and col[29] < 50
    x = to_model_input(out.frames, "cpu", torch.float32)
    assert x.shape == (1, 3, 9, 48, 32) and x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.9


# ------------------------------------------------------------------------------------------------------------ ranks
def test_rank_discovery_order():
    assert discover_ranks(env={}).world_size == 1
    assert (r := discover_ranks(env={"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})).rank == 1
    assert r.world_size == 3 and r.local_rank == 1 and r.source == "env"
    k8s = discover_ranks(env={"JOB_COMPLETION_INDEX": "2", "WORLD_SIZE": "4"})
    assert (k8s.rank, k8s.world_size, k8s.source) == (2, 4, "k8s")
    assert discover_ranks(world_size=5, env={"JOB_COMPLETION_INDEX": "4"}).world_size == 5
    with pytest.raises(CogvxError, match="world size is unknown"):
        discover_ranks(env={"JOB_COMPLETION_INDEX": "0"})
    flags = discover_ranks(rank=0, world_size=2, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (flags.rank, flags.source) == (0, "flags")
    with pytest.raises(CogvxError, match="not within a world of 2"):
        discover_ranks(env={"RANK": "2", "WORLD_SIZE": "2"})
    assert under_mpi({"PMI_RANK": "0", "PMI_SIZE": "2"}) and under_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not under_mpi({"RANK": "0"})


# ----------------------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_key(tiny_checkpoint, dataset, tmp_path):
    model = tiny_checkpoint("CogVideoX-2b")
    with pytest.raises(CogvxError, match=r"^frames: 10 is not valid for CogVideoX-2b"):
        run_prep(_config(model, dataset.data, tmp_path / "a", frames=10))
    with pytest.raises(CogvxError, match=r"^buckets: 30x48"):
        run_prep(_config(model, dataset.data, tmp_path / "b", buckets=[(30, 48)]))
    with pytest.raises(CogvxError, match=r"^shard_max_samples must be > 0"):
        run_prep(_config(model, dataset.data, tmp_path / "c", shard_max_samples=0))
    with pytest.raises(CogvxError, match=r"exclude each other"):
        run_prep(_config(model, dataset.data, tmp_path / "d", target_fps=4.0, frame_stride=2))
    yaml_path = tmp_path / "prep.yaml"
    yaml_path.write_text("model: m\nshard_size: 3\n")
    with pytest.raises(CogvxError, match=r"prep\.yaml: unknown config key shard_size"):
        PrepConfig.from_yaml(yaml_path)
    assert not (tmp_path / "a").exists(), "a config error is found before anything is written"


@pytest.mark.parametrize("line, message", [
    ("text_batch_size: abc", r"text_batch_size must be an integer, got 'abc'"),
    ("vae_tiling: maybe", r"vae_tiling must be true or false, got 'maybe'"),
    ("max_failed_fraction: [1]", r"max_failed_fraction must be a number"),
    ("buckets: 480x720", r"buckets must be a list, got '480x720'"),
    ("buckets: [[480, wide]]", r"buckets: \[480, 'wide'\] is not \[HEIGHT, WIDTH\]"),
    ("shard_max_bytes: lots", r"shard_max_bytes: 'lots' is not a size"),
])
def test_wrong_typed_yaml_value_is_one_line_error_naming_the_key(tmp_path, line, message):
    yaml_path = tmp_path / "prep.yaml"
    yaml_path.write_text(f"model: m\ndata: d\nout: o\n{line}\n")
    with pytest.raises(CogvxError, match=rf"^{re.escape(str(yaml_path))}: {message}") as caught:
        PrepConfig.from_yaml(yaml_path)
    assert "\n" not in str(caught.value)


def test_cli_reports_wrong_typed_yaml_value_in_one_line(tmp_path, capsys):
    yaml_path = tmp_path / "prep.yaml"
    yaml_path.write_text("model: m\ndata: d\nout: o\ntext_batch_size: abc\n")
    code, _, err = cli(capsys, "prep", "--config", str(yaml_path))
    line = assert_one_line_error(code, err)
    assert line == f"cogvx prep: error: {yaml_path}: text_batch_size must be an integer, got 'abc'"


def test_checkpoint_without_component_config_is_one_line_error(tiny_checkpoint, dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("CogVideoX-2b"), model)
    encoder_config = model / "text_encoder" / "config.json"
    values = json.loads(encoder_config.read_text())
    encoder_config.unlink()
    with pytest.raises(CogvxError, match=r"text_encoder holds none of config\.json") as caught:
        run_prep(_config(model, dataset.data, tmp_path / "a"))
    assert "\n" not in str(caught.value)
    del values["d_model"]
    encoder_config.write_text(json.dumps(values))
    with pytest.raises(CogvxError, match=r"text_encoder/config\.json: no 'd_model'") as caught:
        run_prep(_config(model, dataset.data, tmp_path / "a"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "a").exists(), "a checkpoint error is found before anything is written"


# --------------------------------------------------------------------------------------------------- prep, one rank
def test_every_good_video_encoded_once_and_every_bad_one_reported(prepped, dataset):
    out, result = prepped
    samples = _read_shards(out)
    expected = {shard_format.sample_key(s): s for s in dataset.good}
    assert set(samples) == set(expected)
    for key, (_, meta) in samples.items():
        assert meta["source"] == expected[key] and meta["prompt"] == dataset.prompts[expected[key]]
        assert (meta["frames"], meta["height"], meta["width"], meta["fps"]) == (9, 32, 48, 8.0)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["source"] for e in errors} == set(dataset.bad)
    for error in errors:
        assert EXPECTED_REASON[dataset.bad[error["source"]]] in error["reason"], error
        assert error["origin"].startswith("metadata.csv:")
    assert (result.encoded, result.failed, result.exit_code) == (7, 6, 0)


def test_manifest_records_geometry_scaling_and_shards(prepped, dataset):
    out, _ = prepped
    m = shard_format.Manifest.read(out)
    assert (m.family, m.frames, m.height, m.width, m.latent_frames, m.fps) == ("CogVideoX-2b", 9, 32, 48, 3, 8.0)
    assert m.vae_scaling_factor == pytest.approx(1.15258426) and m.invert_scale_latents is False
    assert m.latent_scaling == shard_format.LATENT_SCALING and m.latent_channels == 16
    assert (m.text_max_length, m.text_embed_dim) == (226, 32)
    assert m.dtypes == {shard_format.LATENT_MEAN: "float32", shard_format.LATENT_LOGVAR: "float32",
                        shard_format.PROMPT_EMBEDS: "float32"}
    assert m.num_samples == 7 and m.skipped == 6 and m.extra["inputs"] == 13
    assert [s.samples for s in m.shards] == [3, 3, 1]  # shard_max_samples=3
    index = m.sample_index(Store(out))
    for shard_number, entry in enumerate(m.shards):
        path = out / entry.name
        assert entry.bytes == path.stat().st_size and entry.sha256 == shard_format.file_sha256(path)
        with tarfile.open(path) as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        keys = index.keys_of(shard_number)
        assert keys == list(dict.fromkeys(name.split(".", 1)[0] for name in members))
        for key, sample in zip(keys, index.shard_indices(shard_number)):  # where a ranged read finds each member
            recorded = index.member(sample)
            assert recorded == (*members[f"{key}.{shard_format.TENSORS_EXT}"],
                                *members[f"{key}.{shard_format.META_EXT}"])
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_shards_are_plain_tar_without_pickles(prepped, monkeypatch):
    import itertools
    import pickle

    from cogvx_dist.train.data.reader import ShardIndex
    from cogvx_dist.train.data.streaming import StreamingMicroBatches

    out, _ = prepped
    # Every reader must get through the shards without unpickling anything (a protocol-0/1 pickle would not start
    # with 0x80, so the byte check below alone is not enough). Calls are recorded too, in case a reader swallows
    # the exception.
    unpickled: list[str] = []

    def refuse(name: str):
        def call(*args, **kwargs):
            unpickled.append(name)
            raise AssertionError(f"{name} called while reading prep shards")
        return call

    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    shards = sorted(out.glob("shard-*.tar"))
    listing = subprocess.run(["tar", "-tf", str(shards[0])], capture_output=True, text=True, check=True).stdout
    members = listing.split()
    assert members and all(m.endswith((".json", ".latents.safetensors")) for m in members)
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                assert not data.startswith(b"\x80"), f"{member.name} looks like a pickle"
                if member.name.endswith(".json"):
                    json.loads(data)
                else:
                    header_len = int.from_bytes(data[:8], "little")
                    assert json.loads(data[8 : 8 + header_len])  # a safetensors header, nothing executable
    manifest = shard_format.Manifest.read(out)
    index = ShardIndex(out)
    assert len(index) == manifest.num_samples == 7
    for i in range(len(index)):
        tensors, meta = index.read(i)
        assert tensors[shard_format.LATENT_MEAN].shape == (16, 3, 4, 6) and meta["frames"] == 9
    assert verify(out) == ([], 7)
    stream = StreamingMicroBatches(f"pipe:cat {out}/{{name}}", manifest, micro_batch_size=1, seed=0, rank=0,
                                   start_step=0)
    batches = list(itertools.islice(iter(stream), 4))
    assert len(batches) == 4
    for batch in batches:
        assert batch[shard_format.LATENT_MEAN].shape == (1, 16, 3, 4, 6) and len(batch["keys"]) == 1
        assert batch["keys"][0] in {key for keys in shard_keys(out).values() for key in keys}
    assert unpickled == []


def test_stored_moments_equal_direct_vae_encode(prepped, dataset, tiny_checkpoint):
    from cogvx_dist.core.loading import load_text_encoder, load_tokenizer, load_vae

    out, _ = prepped
    samples = _read_shards(out)
    model = tiny_checkpoint("CogVideoX-2b")
    vae = load_vae(model, torch.float32)
    tokenizer, t5 = load_tokenizer(model), load_text_encoder(model, torch.float32)
    for source in dataset.good[:2]:
        tensors, meta = samples[shard_format.sample_key(source)]
        clip = decode_video(dataset.root / source, 9, [(32, 48)], target_fps=8)
        with torch.no_grad():
            dist = vae.encode(to_model_input(clip.frames, "cpu", torch.float32)).latent_dist
            ids = tokenizer([meta["prompt"]], padding="max_length", max_length=226, truncation=True,
                            return_tensors="pt").input_ids
            embeds = t5(ids)[0][0]
        assert tensors[shard_format.LATENT_MEAN].shape == (16, 3, 4, 6)
        torch.testing.assert_close(tensors[shard_format.LATENT_MEAN], dist.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tensors[shard_format.LATENT_LOGVAR], dist.logvar[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tensors[shard_format.PROMPT_EMBEDS], embeds, rtol=1e-5, atol=1e-5)
        mean = tensors[shard_format.LATENT_MEAN]
        assert not torch.equal(mean, mean * 1.15258426), "unscaled"


def test_channels_last_vae_stores_the_same_moments(prepped, dataset, tiny_checkpoint, tmp_path):
    out, _ = prepped
    fast = tmp_path / "channels-last"
    result = run_prep(_config(tiny_checkpoint("CogVideoX-2b"), dataset.data, fast, vae_channels_last=True))
    assert result.encoded == 7
    reference, samples = _read_shards(out), _read_shards(fast)
    assert samples.keys() == reference.keys()
    for key, (tensors, _) in samples.items():
        for name, value in tensors.items():
            torch.testing.assert_close(value, reference[key][0][name], rtol=1e-5, atol=1e-5)
    assert json.loads(next((fast / "parts").glob("rank-*.json")).read_text())["settings"]["vae_channels_last"]


@pytest.mark.slow
def test_compiled_vae_encoder_gives_the_eager_moments(dataset, tiny_checkpoint):
    from data_prep.encode import Encoders

    clips = [decode_video(dataset.root / source, 9, [(32, 48)], target_fps=8).frames for source in dataset.good[:2]]
    model = tiny_checkpoint("CogVideoX-2b")
    eager = Encoders(str(model), "cpu", torch.float32).encode_clips(clips)
    compiled_encoders = Encoders(str(model), "cpu", torch.float32, channels_last=True, compile=True)
    compiled = compiled_encoders.encode_clips(clips)
    assert type(compiled_encoders.vae().encoder).__name__ == "CogVideoXEncoder3D"  # compiled in place
    assert compiled_encoders.vae().encoder._compiled_call_impl is not None
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rerun_encodes_nothing_again_and_failure_limit_sets_exit_code(prepped, tiny_checkpoint, dataset):
    out, _ = prepped
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    result = run_prep(_config(tiny_checkpoint("CogVideoX-2b"), dataset.data, out, max_failed_fraction=0.1))
    assert (result.encoded, result.already_done, result.failed) == (0, 7, 6)
    assert result.exit_code == 1  # 6 of 13 inputs failed > 10%
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    assert shard_format.Manifest.read(out).num_samples == 7
    with pytest.raises(CogvxError, match=r"other settings \(frames, latent_frames differ"):
        run_prep(_config(tiny_checkpoint("CogVideoX-2b"), dataset.data, out, frames=17))


def test_verify_finds_corruption(prepped, tmp_path):
    out, _ = prepped
    assert verify(out) == ([], 7)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("shard-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    (copy / "shard-r00000-000099.tar").write_bytes(b"")
    problems, _ = verify(copy)
    assert any(p.startswith(f"{shard.name}: sha256 differs") for p in problems)
    assert any(p.startswith("shard-r00000-000099.tar: on disk but not in the manifest") for p in problems)


def test_cli_prep_inspect_verify(tiny_checkpoint, tmp_path, capsys):
    ds = make_synthetic_dataset(tmp_path / "d", count=2, frames=10, height=32, width=48, layout="folder")
    out = tmp_path / "out"
    run = run_cli("prep", "--model", str(tiny_checkpoint("CogVideoX-2b")), "--data", str(ds.data), "--out", str(out),
                  "--storage-dtype", "float32", "--no-progress", "--shard-size", "1MiB")
    assert run.returncode == 0, run.stderr
    assert "encoded 2, skipped 0" in run.stderr and "2 samples in 1 shards" in run.stderr
    code, out_text, _ = cli(capsys, "shards", "inspect", str(out))
    assert code == 0 and "samples      2 in 1 shards" in out_text
    code, out_text, _ = cli(capsys, "shards", "verify", str(out))
    assert code == 0 and out_text.startswith("ok: 2 samples")
    code, _, err = cli(capsys, "prep", "--model", str(tiny_checkpoint("CogVideoX-2b")), "--data", str(ds.data),
                       "--out", str(tmp_path / "x"), "--frames", "12")
    assert assert_one_line_error(code, err).startswith("cogvx prep: error: frames: 12")


# ------------------------------------------------------------------------------------------------- I2V and buckets
def test_image_to_video_and_buckets(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("CogVideoX-5b-I2V")
    ds = make_synthetic_dataset(tmp_path / "i2v", count=2, frames=10, height=48, width=64, layout="jsonl",
                                images=True)
    # One portrait clip without a conditioning image: it goes to the 48x32 bucket and uses its own first frame.
    write_mp4(ds.root / "videos/tall.mp4", render_clip("red", "circle", "down", 10, 64, 48), fps=8)
    with open(ds.data, "a") as handle:
        handle.write(json.dumps({"video": "videos/tall.mp4", "prompt": "a red circle moves down"}) + "\n")
    out = tmp_path / "out"
    result = run_prep(_config(model, ds.data, out, buckets=[(32, 48), (48, 32)], image_noise_samples=3))
    assert (result.encoded, result.failed) == (3, 0)
    manifest = shard_format.Manifest.read(out)
    assert manifest.image_to_video and manifest.sizes() == [(32, 48), (48, 32)]
    assert manifest.image_noise_samples == 3 and manifest.dtypes[shard_format.IMAGE_NOISE_SIGMAS] == "float32"
    samples = _read_shards(out)
    assert verify(out)[0] == []
    from cogvx_dist.core.loading import load_vae
    from data_prep.decode import load_image

    vae = load_vae(model, torch.float32)
    tall = samples[shard_format.sample_key("videos/tall.mp4")]
    assert (tall[1]["height"], tall[1]["width"]) == (48, 32)
    assert tall[0][shard_format.IMAGE_MEAN].shape == (16, 1, 6, 4)
    clip = decode_video(ds.root / "videos/tall.mp4", 9, [(32, 48), (48, 32)], target_fps=8)
    with torch.no_grad():
        first = vae.encode(to_model_input(clip.frames[:1], "cpu", torch.float32)).latent_dist
    torch.testing.assert_close(tall[0][shard_format.IMAGE_MEAN], first.mean[0], rtol=1e-5, atol=1e-5)

    # The official I2V recipe at prep: K copies of the frame with pixel noise sigma = exp(N(-3, 0.5)), seeded by
    # the sample's key, each encoded; the sigmas are stored as a tensor and in the sample's JSON.
    from data_prep.encode import noised_copies

    key = shard_format.sample_key("videos/tall.mp4")
    sigmas, copies = noised_copies(to_model_input(clip.frames[:1], "cpu", torch.float32)[0], key, 3)
    assert torch.equal(tall[0][shard_format.IMAGE_NOISE_SIGMAS], sigmas) and sigmas.shape == (3,)
    assert tall[1]["image_noise_sigmas"] == [round(float(s), 6) for s in sigmas]
    assert all(0.005 < float(s) < 0.5 for s in sigmas) and len(set(sigmas.tolist())) == 3
    with torch.no_grad():
        noised = vae.encode(copies).latent_dist
    assert tall[0][shard_format.NOISED_IMAGE_MEAN].shape == (3, 16, 1, 6, 4)
    torch.testing.assert_close(tall[0][shard_format.NOISED_IMAGE_MEAN], noised.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tall[0][shard_format.NOISED_IMAGE_LOGVAR], noised.logvar, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(noised.mean[0], first.mean[0], atol=1e-4)  # the noise reached the latents
    listed = samples[shard_format.sample_key(ds.good[0])]
    image = load_image(ds.root / ds.good[0].replace(".mp4", ".png"), (32, 48))
    with torch.no_grad():
        cond = vae.encode(to_model_input(image, "cpu", torch.float32)).latent_dist
    torch.testing.assert_close(listed[0][shard_format.IMAGE_LOGVAR], cond.logvar[0], rtol=1e-5, atol=1e-5)


def test_chunked_t5_and_batched_vae_give_the_same_samples(prepped, tiny_checkpoint, dataset, tmp_path):
    # text_chunk=3 makes T5 load, run and be freed three times between VAE rounds; batches of 2 clips per VAE call.
    out, _ = prepped
    result = run_prep(_config(tiny_checkpoint("CogVideoX-2b"), dataset.data, tmp_path / "o", text_chunk=3,
                              vae_batch_size=2, decode_workers=1))
    assert (result.encoded, result.failed) == (7, 6)
    a, b = _read_shards(out), _read_shards(tmp_path / "o")
    assert set(a) == set(b)
    for key in a:
        assert a[key][1] == b[key][1]
        for name, tensor in a[key][0].items():
            torch.testing.assert_close(b[key][0][name], tensor, rtol=1e-5, atol=1e-5)


def test_cli_config_yaml_with_flag_overrides(tmp_path):
    from cogvx_dist.cli import build_parser
    from cogvx_dist.cli.prep import config_from_args

    path = tmp_path / "prep.yaml"
    path.write_text("model: m\ndata: d\nout: o\nbuckets: [480x720, [720, 480]]\nframe_stride: 2\n"
                    "shard_max_bytes: 64MiB\nvae_tiling: true\n")
    args = build_parser().parse_args(["prep", "--config", str(path), "--fps", "8", "--shard-samples", "5",
                                      "--no-vae-tiling"])
    config = config_from_args(args)
    assert config.buckets == [(480, 720), (720, 480)] and config.shard_max_bytes == 64 << 20
    assert (config.target_fps, config.frame_stride) == (8.0, None)  # the flag's sampling mode replaces the file's
    assert config.shard_max_samples == 5 and config.vae_tiling is False and config.model == "m"
    config.check_basic()


def test_failure_limit_is_on_the_whole_job_not_one_ranks_slice(tiny_checkpoint, dataset, tmp_path):
    """All bad inputs on rank 0's slice: 6 of 13 fail, under a 0.5 limit for the job although 6 of rank 0's 7 fail."""
    import csv

    rows = list(csv.DictReader(open(dataset.data, newline="")))
    bad = [r for r in rows if r["video"] in dataset.bad]
    good = [r for r in rows if r["video"] not in dataset.bad]
    assert (len(bad), len(good)) == (6, 7)
    ordered = [None] * 13
    ordered[0::2] = bad + good[:1]  # rank 0 of 2 takes the even positions
    ordered[1::2] = good[1:]
    skewed = dataset.root / "skewed.csv"
    with open(skewed, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(ordered)
    model = tiny_checkpoint("CogVideoX-2b")

    def run(out: Path, rank: int, limit: float):
        return run_prep(_config(model, skewed, out, rank=rank, world_size=2, max_failed_fraction=limit))

    first, last = run(tmp_path / "under", 0, 0.5), run(tmp_path / "under", 1, 0.5)
    assert (first.failed, first.exit_code, first.manifest) == (6, 0, None)
    assert (last.failed, last.job_skipped, last.exit_code) == (0, 6, 0)  # the last rank merged the manifest

    first, last = run(tmp_path / "over", 0, 0.4), run(tmp_path / "over", 1, 0.4)
    assert first.exit_code == 1  # 6 of the job's 13 inputs are already more than 0.4, whatever rank 1 finds
    assert (last.failed, last.exit_code) == (0, 1)  # rank 1 is clean, but the job it merged is over the limit


def test_cogvideo_layout_with_prompt_txt_or_named_lists(tmp_path):
    from data_prep.inputs import ListFiles, caption_list

    ds = make_synthetic_dataset(tmp_path / "set", count=2, frames=10, height=32, width=48, layout="cogvideo")
    (ds.root / "prompts.txt").rename(ds.root / "prompt.txt")  # CogVideo's launch scripts and finetrainers
    root, records = read_records(ds.root)
    assert [r.prompt for r in records] == [ds.prompts[g] for g in ds.good]
    assert caption_list(ds.root) == ds.root / "prompt.txt"
    (ds.root / "prompt.txt").rename(ds.root / "captions.list")
    (ds.root / "videos.txt").rename(ds.root / "clips.list")
    with pytest.raises(CogvxError, match="caption list"):
        read_records(ds.root, "cogvideo")
    named = ListFiles(captions="captions.list", videos="clips.list")
    _, again = read_records(ds.root, "auto", named)
    assert [r.prompt for r in again] == [r.prompt for r in records]
    (ds.root / "prompt.txt").write_text("x\n")
    (ds.root / "prompts.txt").write_text("y\n")
    with pytest.raises(CogvxError, match="both prompts.txt and prompt.txt"):
        read_records(ds.root, "cogvideo", ListFiles(videos="clips.list"))


def test_prep_cli_takes_caption_and_video_file_names(tiny_checkpoint, tmp_path, capsys):
    from cogvx_dist.cli import build_parser
    from cogvx_dist.cli.prep import config_from_args

    args = build_parser().parse_args(["prep", "--model", "m", "--data", "d", "--out", "o", "--caption-file",
                                      "prompt.txt", "--video-file", "list.txt", "--image-file", "firsts.txt"])
    config = config_from_args(args)
    assert (config.caption_file, config.video_file, config.image_file) == ("prompt.txt", "list.txt", "firsts.txt")


def test_a_prompt_prefix_is_what_t5_encodes_and_the_manifest_records(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("CogVideoX-2b")
    data = make_synthetic_dataset(tmp_path / "clips", count=2, frames=10, height=32, width=48, seed=3).data
    run_prep(_config(model, data, tmp_path / "plain"))
    run_prep(_config(model, data, tmp_path / "prefixed", prompt_prefix="<sks> "))
    plain, prefixed = _read_shards(tmp_path / "plain"), _read_shards(tmp_path / "prefixed")
    assert plain.keys() == prefixed.keys() and len(plain) == 2
    for key, (tensors, meta) in prefixed.items():
        assert meta["prompt"] == "<sks> " + meta["caption"] and meta["caption"] == plain[key][1]["prompt"]
        assert torch.equal(tensors[shard_format.LATENT_MEAN], plain[key][0][shard_format.LATENT_MEAN])
        assert not torch.equal(tensors[shard_format.PROMPT_EMBEDS], plain[key][0][shard_format.PROMPT_EMBEDS])
    assert shard_format.Manifest.read(tmp_path / "prefixed").prompt_template == "<sks> {prompt}"
    # The caption-dropout embedding, once a dataset.
    empty = shard_format.read_empty_prompt(Store(tmp_path / "prefixed"))
    assert empty.shape == (226, 32) and torch.equal(empty, shard_format.read_empty_prompt(Store(tmp_path / "plain")))
    assert not torch.equal(empty, next(iter(plain.values()))[0][shard_format.PROMPT_EMBEDS])
    (tmp_path / "plain" / shard_format.EMPTY_PROMPT_NAME).unlink()  # as prepped before caption dropout existed
    again = run_prep(_config(model, data, tmp_path / "plain"))
    assert again.encoded == 0 and torch.equal(shard_format.read_empty_prompt(Store(tmp_path / "plain")), empty)
    assert shard_format.Manifest.read(tmp_path / "plain").prompt_template == "{prompt}"


def test_prompts_past_the_text_length_are_counted_and_their_tokens_recorded(tiny_checkpoint, tmp_path):
    """T5 reads 226 tokens and the pipeline cuts the rest; prep says how many prompts lost words and by how much."""
    from cogvx_dist.core.loading import load_tokenizer

    model = tiny_checkpoint("CogVideoX-2b")
    data = make_synthetic_dataset(tmp_path / "clips", count=2, frames=10, height=32, width=48, seed=3).data
    short = run_prep(_config(model, data, tmp_path / "short"))
    long = run_prep(_config(model, data, tmp_path / "long", prompt_prefix="a slow pan over the hills " * 40))
    tokenizer = load_tokenizer(model)
    for result, folder, cut in ((short, "short", False), (long, "long", True)):
        assert result.truncated_prompts == (2 if cut else 0)
        totals = shard_format.Manifest.read(tmp_path / folder).extra["totals_last_run"]
        assert totals["truncated_prompts"] == result.truncated_prompts
        for _, meta in _read_shards(tmp_path / folder).values():
            assert meta["prompt_tokens"] == len(tokenizer(meta["prompt"]).input_ids)
            assert (meta["prompt_tokens"] > 226) == cut


@pytest.mark.parametrize("flags, message", [
    (["--prompt-prefix", "a ", "--prompt-template", "{prompt} b"], "prompt_prefix and prompt_template exclude"),
    (["--prompt-template", "in the style of <sks>"], "prompt_template 'in the style of <sks>' has no {prompt}"),
    (["--image-noise-samples", "-1"], "image_noise_samples must be >= 0 (0: none), not -1"),
])
def test_prompt_and_image_noise_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    code, _, err = cli(capsys, "prep", "--model", str(tiny_checkpoint("CogVideoX-2b")), "--data", str(tmp_path),
                       "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(code, err, message)


# ---------------------------------------------------------------------------------------------------- single images
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_single_images_prep_beside_videos_as_one_frame_samples(tiny_checkpoint, tmp_path, layout):
    """PNG, JPEG and WebP stills listed like videos (or captioned beside them in a folder) become one-frame samples
    in their own frame-count bucket; the shards verify and read with plain webdataset."""
    from data_prep.decode import decode_image

    model = tiny_checkpoint("CogVideoX-2b")
    ds = make_synthetic_dataset(tmp_path / "d", count=2, frames=10, height=48, width=64, layout=layout, stills=3)
    out = tmp_path / "out"
    result = run_prep(_config(model, ds.data, out))
    assert (result.encoded, result.failed) == (5, 0)
    manifest = shard_format.Manifest.read(out)
    assert manifest.frame_counts == [9, 1] and manifest.all_frame_counts() == [9, 1]
    assert verify(out)[0] == []
    samples = _read_shards(out)
    stills = [name for name in ds.good if "still_" in name]
    assert {Path(name).suffix for name in stills} == {".png", ".jpg", ".webp"}
    from cogvx_dist.core.loading import load_vae

    vae = load_vae(model, torch.float32)
    for name in stills:
        tensors, meta = samples[shard_format.sample_key(name)]
        assert meta["frames"] == 1 and meta["video"] == name and meta["caption"].startswith("a ")
        assert tensors[shard_format.LATENT_MEAN].shape == (16, 1, 4, 6)
        with torch.no_grad():
            encoded = vae.encode(to_model_input(decode_image(ds.root / name, [(32, 48)]).frames, "cpu",
                                                torch.float32)).latent_dist
        torch.testing.assert_close(tensors[shard_format.LATENT_MEAN], encoded.mean[0], rtol=1e-5, atol=1e-5)
    videos = [name for name in ds.good if name.endswith(".mp4")]
    assert all(samples[shard_format.sample_key(name)][0][shard_format.LATENT_MEAN].shape == (16, 3, 4, 6)
               for name in videos)


def test_single_images_are_refused_where_the_family_cannot_take_them(tiny_checkpoint, tmp_path, capsys):
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.train.preflight import check_manifest

    ds = make_synthetic_dataset(tmp_path / "d", count=1, frames=10, height=48, width=64, layout="jsonl", stills=1)
    model = tiny_checkpoint("CogVideoX-5b-I2V")
    code, _, err = cli(capsys, "prep", "--model", str(model), "--data", str(ds.data), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "1 input(s) are single images (videos/still_0000.png",
                          "CogVideoX-5b-I2V learned its position embeddings for one frame count")
    assert not (tmp_path / "o").exists()
    # Shards with single images, read for an image-to-video model: refused before training, saying why.
    t2v = tiny_checkpoint("CogVideoX1.5-5b")
    i2v = describe_checkpoint(tiny_checkpoint("CogVideoX1.5-5b-I2V"))
    run_prep(_config(t2v, ds.data, tmp_path / "t2v"))
    manifest = shard_format.Manifest.read(tmp_path / "t2v")
    assert manifest.frame_counts == [17, 1]
    with pytest.raises(CogvxError, match="single images among the clips .*is image-to-video: it is conditioned"):
        check_manifest(manifest, i2v, where="data.shards")


# ------------------------------------------------------------------ frame buckets, clips per video, what the data is
MIXED = {  # name: (frames at 8 fps, height, width)
    "long": (60, 32, 48),     # 7.5 s: three 17-frame clips
    "medium": (20, 48, 64),   # one 17-frame clip, 1/9 of its frame cropped (scaled to 36x48, cut to 32x48)
    "tall": (12, 64, 48),     # one 9-frame clip, portrait bucket
    "wide": (12, 32, 96),     # one 9-frame clip, half its frame cropped
    "short": (6, 32, 48),     # 0.75 s: shorter than the shortest bucket
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A folder of clips of several lengths and shapes (name.mp4 + name.txt)."""
    root = tmp_path_factory.mktemp("mixed")
    for n, (name, (frames, height, width)) in enumerate(MIXED.items()):
        write_mp4(root / f"{name}.mp4", render_clip("red", "square", "right", frames, height, width, seed=n), fps=8)
        (root / f"{name}.txt").write_text(f"a red square moves right, {name}")
    return root


def _mixed_config(model: Path, data: Path, out: Path, **kw) -> PrepConfig:
    return _config(model, data, out, frames=[9, 17], clips_per_video=3, buckets=[(32, 48), (48, 32)],
                   shard_max_samples=2, **kw)


def _digests(out: Path) -> dict[str, str]:
    manifest = shard_format.Manifest.read(out)
    index = manifest.sample_index(Store(out))
    return {index.key(i): index.digest(i) for i in range(len(index))}


def test_frame_buckets_and_clips_per_video_prep_count_and_resume(tiny_checkpoint, mixed, tmp_path, capsys):
    from cogvx_dist.train.data.reader import ShardIndex

    model, out = tiny_checkpoint("CogVideoX-2b"), tmp_path / "out"
    run = run_cli("prep", "--model", str(model), "--data", str(mixed), "--out", str(out), "--frames", "9,17",
                  "--clips-per-video", "3", "--resolution", "32x48", "--resolution", "48x32", "--shard-samples", "2",
                  "--storage-dtype", "float32", "--no-progress", "--max-failed-fraction", "0.5")
    assert run.returncode == 0, run.stderr
    assert "encoded 6, skipped 1" in run.stderr
    warnings = [line for line in run.stderr.splitlines() if "lost more than 25%" in line]
    assert len(warnings) == 1 and "1 of 6 samples" in warnings[0], run.stderr
    key = {name: shard_format.sample_key(f"{name}.mp4") for name in MIXED}
    samples = _read_shards(out)
    expected = {shard_format.window_key(key["long"], w) for w in range(3)}
    expected |= {shard_format.window_key(key[name], 0) for name in ("medium", "tall", "wide")}
    assert set(samples) == expected
    shape = {k: (m["frames"], m["height"], m["width"]) for k, (_, m) in samples.items()}
    assert shape[f"{key['medium']}-w01"] == (17, 32, 48) and shape[f"{key['tall']}-w01"] == (9, 48, 32)
    longs = [samples[f"{key['long']}-w0{w}"][1] for w in (1, 2, 3)]
    assert [(m["window"], m["windows"], m["frames"]) for m in longs] == [(1, 3, 17), (2, 3, 17), (3, 3, 17)]
    assert [m["start_seconds"] for m in longs] == [0.0, 2.75, 5.375]  # frames 0, 22 and 43 of 60: evenly spread
    assert [e["reason"] for e in map(json.loads, (out / shard_format.ERRORS_NAME).read_text().splitlines())] == [
        "too short: 6 decodable frames, need 9: the clip lasts 0.75 s at 8 fps, 9 frames at 8 fps (the shortest "
        "frame bucket) need 1.12 s; the clip has fewer frames than 9 at any rate: use a shorter frame bucket "
        "(--frames)"]

    manifest = shard_format.Manifest.read(out)
    assert (manifest.frames, manifest.frame_counts, manifest.clips_per_video) == (17, [17, 9], 3)
    assert manifest.bucket_samples() == {(17, 32, 48): 4, (17, 48, 32): 0, (9, 32, 48): 1, (9, 48, 32): 1}
    stats = manifest.stats
    assert stats["samples"] == 6 and stats["seconds"] == pytest.approx((4 * 17 + 2 * 9) / 8)
    assert stats["cropped_over_quarter"] == 1
    crops = {(b["frames"], b["height"], b["width"]): b["crop_fraction"] for b in stats["buckets"]}
    assert crops[(9, 32, 48)] == 0.5 and crops[(17, 32, 48)] == pytest.approx((1 - 32 / 36) / 4, abs=1e-4)
    # The train side names every bucket from the manifest (not "latents CxFxHxW") and finds the same counts.
    buckets = {b.name: len(b.samples) for b in ShardIndex(out).buckets()}
    assert buckets == {"32x48, 17 frames": 4, "32x48, 9 frames": 1, "48x32, 9 frames": 1}
    assert verify(out)[0] == []
    code, text, _ = cli(capsys, "shards", "inspect", str(out))
    assert code == 0 and "17 or 9 frames" in text and "up to 3 a video" in text
    assert re.search(r"contents +6 samples, 10\.8 s; the crop cuts 12\.0% of a frame on average; 1 lose", text), text
    assert re.search(r"17 frames, 32x48 +4 samples +8\.5 s +crop +2\.8%", text), text

    # A rerun encodes nothing; a lost shard's clips, and only those, are encoded again, to the same bytes.
    digests = _digests(out)
    first_sha256s = {p.name: shard_format.file_sha256(p) for p in out.glob("shard-*.tar")}
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    result = run_prep(_mixed_config(model, mixed, out))
    assert (result.encoded, result.already_done, result.failed) == (0, 4, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    lost = next(p for p in sorted(out.glob("shard-*.tar")) if f"{key['long']}-w02" in shard_keys(out)[p.name])
    lost_keys = shard_keys(out)[lost.name]
    lost.unlink()
    result = run_prep(_mixed_config(model, mixed, out))
    assert (result.encoded, result.already_done) == (len(lost_keys), 4 - len({k[:20] for k in lost_keys}))
    assert _digests(out) == digests and shard_format.Manifest.read(out).stats == stats
    code, _, err = cli(capsys, "prep", "finalize", str(out))
    assert code == 0 and err.startswith("warning: 1 of 6 samples lost more than 25% of their frame to cropping (mean "
                                        "12% over all; most in the 9 frames, 32x48 bucket)"), err
    # A fresh prep of the same inputs writes the same shards, byte for byte.
    again = tmp_path / "again"
    run_prep(_mixed_config(model, mixed, again))
    assert {p.name: shard_format.file_sha256(p) for p in again.glob("shard-*.tar")} == first_sha256s


def test_frame_buckets_and_clips_per_video_settings(tiny_checkpoint, tmp_path, capsys):
    from cogvx_dist.cli import build_parser
    from cogvx_dist.cli.prep import config_from_args
    from cogvx_dist.core.loading import describe_checkpoint

    def flags(*more: str) -> PrepConfig:
        return config_from_args(build_parser().parse_args(["prep", "--model", "m", "--data", "d", "--out", "o", *more]))

    assert flags("--frames", "49").frames == 49  # one count stays an int
    assert flags("--frames", "49,25").frames == [49, 25] == flags("--frames", "49", "--frames", "25").frames
    assert flags("--frames", "25,49").frame_counts() == [49, 25]
    assert flags("--clips-per-video", "4").clips_per_video == 4 and flags().clips_per_video == 1
    for text, frames in (("frames: 49\n", 49), ("frames: [49, 25]\n", [49, 25]), ("frames: '49, 25'\n", [49, 25])):
        (tmp_path / "p.yaml").write_text(text)
        assert PrepConfig.from_yaml(tmp_path / "p.yaml").frames == frames
    model, data = tiny_checkpoint("CogVideoX-2b"), str(tmp_path)
    for more, message in ((["--frames", "49,x"], "--frames: '49,x' is not a frame count"),
                          (["--frames", "17,17"], "frames: a frame count is listed twice"),
                          (["--clips-per-video", "0"], "clips_per_video must be >= 1"),
                          (["--frames", "17,12"], "frames: 12 is not valid for CogVideoX-2b")):
        code, _, err = cli(capsys, "prep", "--model", str(model), "--data", data, "--out", str(tmp_path / "o"), *more)
        assert message in assert_one_line_error(code, err), err
    (tmp_path / "p.yaml").write_text("frames: [17, 'nine']\n")
    with pytest.raises(CogvxError, match=r"frames"):
        PrepConfig.from_yaml(tmp_path / "p.yaml")
    # Learned position embeddings (5b-I2V) take the default frame count only, in a list too.
    info = describe_checkpoint(tiny_checkpoint("CogVideoX-5b-I2V"))
    config = PrepConfig(model="m", data="d", out="o", frames=[info.frames, info.frames + 8])
    with pytest.raises(CogvxError, match=rf"frames: CogVideoX-5b-I2V learned its position embeddings for "
                                         rf"{info.frames} frames, not {info.frames + 8}"):
        config.frame_buckets(info.family, info.frames)


def test_manifests_without_counts_still_read_and_the_merge_counts_them(prepped, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(prepped[0], out)
    data = json.loads((out / shard_format.MANIFEST_NAME).read_text())
    counted = data.pop("stats")
    data.pop("clips_per_video")
    for part in (out / shard_format.PARTS_DIR).glob("rank-*.json"):  # progress files of a prep that kept no summary
        kept = json.loads(part.read_text())
        kept.pop("summaries")
        part.write_text(json.dumps(kept))
    (out / shard_format.MANIFEST_NAME).write_text(json.dumps(data))
    manifest = shard_format.Manifest.read(out)
    assert manifest.stats == {} and manifest.clips_per_video == 1 and manifest.bucket_samples() is None
    code, text, _ = cli(capsys, "shards", "inspect", str(out))
    assert code == 0 and "contents     not recorded" in text
    from data_prep.shards import finalize

    finalize(out)
    assert shard_format.Manifest.read(out).stats == counted  # read from the shards' JSON members
    assert counted["samples"] == 7 and counted["buckets"][0]["samples"] == 7


def test_each_clip_of_a_video_conditions_on_its_own_first_frame(tiny_checkpoint, tmp_path):
    from cogvx_dist.core.loading import load_vae
    from data_prep.decode import decode_windows
    from data_prep.encode import noised_copies

    model = tiny_checkpoint("CogVideoX-5b-I2V")
    write_mp4(tmp_path / "data/long.mp4", render_clip("green", "square", "left", 30, 32, 48), fps=8)
    (tmp_path / "data/long.txt").write_text("a green square moves left")
    out = tmp_path / "out"
    result = run_prep(_config(model, tmp_path / "data", out, clips_per_video=2, image_noise_samples=1))
    assert result.encoded == 2
    samples = _read_shards(out)
    key = shard_format.sample_key("long.mp4")
    _, clips = decode_windows(tmp_path / "data/long.mp4", 9, [(32, 48)], target_fps=8, windows=2)
    vae = load_vae(model, torch.float32)
    for clip in clips:
        tensors, meta = samples[shard_format.window_key(key, clip.window)]
        assert meta["start_seconds"] == clip.start and (meta["window"], meta["windows"]) == (clip.window + 1, 2)
        first = to_model_input(clip.frames[:1], "cpu", torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(tensors[shard_format.IMAGE_MEAN], vae.encode(first).latent_dist.mean[0],
                                       rtol=1e-5, atol=1e-5)
        sigmas, _ = noised_copies(first[0], shard_format.window_key(key, clip.window), 1)
        assert torch.equal(tensors[shard_format.IMAGE_NOISE_SIGMAS], sigmas)  # each clip's noise its own
    assert clips[1].start == 2.625 and not np.array_equal(clips[0].frames[0], clips[1].frames[0])
