"""Results: `cogvx sample` (with/without a LoRA, errors), `cogvx sample --watch`, `cogvx report`, `cogvx demo`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx_dist.train.checkpoints import LORA_SUBDIR, checkpoint_folder, commit
from cogvx_dist.core.lora import LORA_WEIGHTS_NAME, LoraSettings, export_lora, inject_lora, lora_state_dict
from cogvx_dist.core.loading import load_transformer
from tests.conftest import REPO, run_cli

SETTINGS = LoraSettings(rank=4, alpha=4.0)


def decode_mp4(path: Path) -> np.ndarray:
    """All frames of an mp4 as uint8 [F, H, W, 3], decoded with PyAV (what a user's player would show)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def make_adapter(model: Path, out_dir: Path, seed: int, strength: float = 0.5) -> Path:
    """Export a LoRA whose B matrices are non-zero (a freshly injected one is an exact no-op)."""
    transformer = load_transformer(model)
    inject_lora(transformer, SETTINGS, seed=seed)
    state = lora_state_dict(transformer)
    generator = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=generator) * strength if ".lora_B." in k else v.clone())
             for k, v in state.items()}
    return export_lora(state, SETTINGS, out_dir)


def write_checkpoint(run: Path, model: Path, step: int, seed: int) -> Path:
    """A committed checkpoint folder as the trainer lays it out (lora/ + commit marker written last)."""
    folder = checkpoint_folder(run, step)
    make_adapter(model, folder / LORA_SUBDIR, seed)
    commit(folder, {"step": step})
    return folder


@pytest.fixture(scope="module")
def model_2b(tiny_checkpoint) -> Path:
    return tiny_checkpoint("CogVideoX-2b")


def test_sample_with_and_without_lora_differ_and_bad_lora_is_one_line(model_2b, tmp_path):
    make_adapter(model_2b, tmp_path / "adapter", seed=1)
    common = ["--model", str(model_2b), "--prompt", "a red square moves left", "--inference-steps", "2",
              "--seed", "3"]
    base = run_cli("sample", *common, "--out", str(tmp_path / "base.mp4"), timeout=300)
    assert base.returncode == 0, base.stderr[-2000:]
    lora = run_cli("sample", *common, "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora.mp4"),
                   "--gif", timeout=300)
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert "with LoRA" in lora.stdout

    without, with_lora = decode_mp4(tmp_path / "base.mp4"), decode_mp4(tmp_path / "lora.mp4")
    assert without.shape == with_lora.shape == (9, 32, 48, 3)  # the tiny checkpoint's defaults
    assert np.abs(without.astype(float) - with_lora.astype(float)).mean() > 1.0
    for name in ("base_grid.png", "lora_grid.png", "lora.gif", "lora.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "lora.json").read_text())["lora"] == str(tmp_path / "adapter")

    # Mistakes are one line on stderr (exit 2), not a traceback.
    missing = run_cli("sample", *common, "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "x.mp4"))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_file = run_cli("sample", *common, "--lora", str(empty), "--out", str(tmp_path / "x.mp4"))
    for result, words in ((missing, "does not exist"), (no_file, LORA_WEIGHTS_NAME)):
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and lines[0].startswith("cogvx sample: error:"), lines


def test_lora_for_another_model_is_rejected_in_process(model_2b, tmp_path):
    """An adapter naming layers this transformer lacks (a deeper model's) fails with one clear message."""
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.sample import SampleSettings, Sampler

    transformer = load_transformer(model_2b)
    inject_lora(transformer, SETTINGS, seed=0)
    state = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in lora_state_dict(transformer).items()}
    export_lora(state, SETTINGS, tmp_path / "foreign")
    sampler = Sampler(model_2b, device="cpu")
    with pytest.raises(CogvxError, match="transformer_blocks.7.* another model"):
        sampler.set_lora(tmp_path / "foreign")
    with pytest.raises(CogvxError, match="text-to-video"):
        sampler.generate("x", SampleSettings(num_inference_steps=1), image=tmp_path / "first.png")


def test_lora_from_another_family_of_equal_shapes_is_refused_unless_allowed(tiny_checkpoint, tmp_path):
    """5b and 5b-I2V adapters have the same shapes: only the family recorded at export tells them apart."""
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.core.lora import load_exported_lora
    from cogvx_dist.results.sample import Sampler

    source, target = tiny_checkpoint("CogVideoX-5b"), tiny_checkpoint("CogVideoX-5b-I2V")
    transformer = load_transformer(source)
    inject_lora(transformer, SETTINGS, seed=0)
    export_lora(lora_state_dict(transformer), SETTINGS, tmp_path / "lora-5b", family="CogVideoX-5b")
    assert load_exported_lora(tmp_path / "lora-5b").family == "CogVideoX-5b"

    with pytest.raises(CogvxError, match=r"trained on CogVideoX-5b, but .* is CogVideoX-5b-I2V; pass --allow-other"):
        Sampler(target, device="cpu").set_lora(tmp_path / "lora-5b")
    sampler = Sampler(target, device="cpu", allow_other_family=True)
    sampler.set_lora(tmp_path / "lora-5b")  # the shapes fit: it applies when asked to
    assert sampler.lora == tmp_path / "lora-5b"
    # The record is not PEFT's base_model_name_or_path, which PEFT would look up on the hub as a repository.
    assert [c.base_model_name_or_path for c in sampler.pipe.transformer.peft_config.values()] == [None]

    # Shapes that do not fit are reported as such, with no suggestion that the flag would help.
    state = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in lora_state_dict(transformer).items()}
    export_lora(state, SETTINGS, tmp_path / "deeper", family="CogVideoX-5b")
    with pytest.raises(CogvxError, match=r"trained on CogVideoX-5b\) targets transformer_blocks.7") as refused:
        Sampler(target, device="cpu", allow_other_family=True).set_lora(tmp_path / "deeper")
    assert "--allow-other-family" not in str(refused.value)
    Sampler(source, device="cpu").set_lora(tmp_path / "lora-5b")  # its own family

    # Files without the record (other tools, older exports) are checked by shape only.
    export_lora(lora_state_dict(transformer), SETTINGS, tmp_path / "unrecorded")
    assert load_exported_lora(tmp_path / "unrecorded").family is None
    Sampler(target, device="cpu").set_lora(tmp_path / "unrecorded")


def test_image_to_video_family_samples_from_a_first_frame(tiny_checkpoint, tmp_path):
    from PIL import Image

    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.sample import SampleSettings, Sampler

    sampler = Sampler(tiny_checkpoint("CogVideoX-5b-I2V"), device="cpu")
    assert type(sampler.pipe).__name__ == "CogVideoXImageToVideoPipeline"
    with pytest.raises(CogvxError, match="--image"):
        sampler.generate("a red square moves left", SampleSettings(num_inference_steps=1))
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "first.png")
    frames = sampler.generate("a red square moves left", SampleSettings(num_inference_steps=1),
                              image=tmp_path / "first.png")
    assert frames.shape == (9, 32, 48, 3) and 0.0 <= frames.min() and frames.max() <= 1.0


def test_watch_samples_a_checkpoint_committed_while_it_runs(model_2b, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": {"path": str(model_2b)}}))  # model from the run
    write_checkpoint(run, model_2b, step=2, seed=2)
    # An uncommitted folder (a save in progress) must be ignored.
    (checkpoint_folder(run, 3) / LORA_SUBDIR).mkdir(parents=True)

    command = [sys.executable, "-m", "cogvx_dist", "sample", "--watch", str(run), "--prompt", "a blue circle moves up",
               "--prompt", "a red square moves left", "--inference-steps", "2", "--interval", "0.5",
               "--stop-after", "2", "--max-wait", "240"]
    watcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record = run / "validation" / "validated.json"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and watcher.poll() is None:
            if record.is_file() and "2" in json.loads(record.read_text())["steps"]:
                break
            time.sleep(0.5)
        assert watcher.poll() is None, watcher.stdout.read()
        assert "2" in json.loads(record.read_text())["steps"], "first checkpoint was not validated"
        write_checkpoint(run, model_2b, step=5, seed=5)  # a new checkpoint while the watcher runs
        output, _ = watcher.communicate(timeout=180)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, output[-3000:]
    assert "validated steps [2, 5]" in output, output[-3000:]

    steps = json.loads(record.read_text())["steps"]
    assert sorted(steps) == ["2", "5"]
    for step in (2, 5):
        folder = run / "validation" / f"step-{step:08d}"
        clips = sorted(folder.glob("*.mp4"))
        assert len(clips) == 2 and len(list(folder.glob("*_grid.png"))) == 2
        assert decode_mp4(clips[0]).shape[0] == 9
        assert (folder / LORA_SUBDIR / LORA_WEIGHTS_NAME).is_file()  # the adapter that made them
    assert (run / "validation" / "base").is_dir()  # baseline without a LoRA
    # Different adapters, same prompt and noise: different clips.
    first = decode_mp4(sorted((run / "validation" / "step-00000002").glob("*.mp4"))[0]).astype(float)
    second = decode_mp4(sorted((run / "validation" / "step-00000005").glob("*.mp4"))[0]).astype(float)
    assert np.abs(first - second).mean() > 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "validation"))
    events.Reload()
    tags = events.Tags()["images"]
    assert any(tag.endswith("_lora") for tag in tags)
    assert sorted({e.step for tag in tags if tag.endswith("_lora") for e in events.Images(tag)}) == [2, 5]

    # A restart skips what the record holds; with training finished it stops by itself (--until-done).
    (run / "train_summary.json").write_text("{}")
    again = run_cli("sample", "--watch", str(run), "--prompt", "a blue circle moves up", "--inference-steps", "2",
                    "--interval", "0.2", "--max-wait", "60", timeout=200)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "validated steps none" in again.stdout and "training finished" in again.stdout, again.stdout


@pytest.mark.parametrize("text", ["{not json", '{"model": {}}', '{"model": "m"}', "[]", '{"model": {"path": 3}}'])
def test_watch_with_a_broken_run_config_is_one_line(tmp_path, text):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.sample import run_model

    (tmp_path / "run_config.json").write_text(text)
    with pytest.raises(CogvxError, match=re.escape(str(tmp_path / "run_config.json")) + ".*pass --model") as info:
        run_model(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "run_config.json").write_text('{"model": {"path": "/models/2b"}}')
    assert run_model(tmp_path) == "/models/2b"


def test_validation_record_is_replaced_whole(tmp_path):
    from cogvx_dist.results.sample import _load_record, _write_record

    path = tmp_path / "validated.json"
    _write_record(path, {"steps": {"2": {"folder": "step-00000002"}}})
    _write_record(path, {"steps": {"2": {}, "4": {}}})
    assert _load_record(path) == {"steps": {"2": {}, "4": {}}}
    assert [p.name for p in tmp_path.iterdir()] == ["validated.json"]  # no temporary left behind


def _step_time(step: int) -> float:
    return (0.2, 0.4, 0.8)[step % 3]


def _write_metrics(run: Path, steps: int) -> None:
    from cogvx_dist.train.metrics import MetricsWriter

    writer = MetricsWriter(run, enabled=True, tensorboard=False)
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        loss = 1.0 + 0.8 * np.exp(-step / 8) + 0.05 * rng.standard_normal()
        # 4 samples a step in a varying time: fast and slow steps, so a time-weighted rate differs from a mean.
        step_time = _step_time(step)
        writer.log(step, {"loss": float(loss), "grad_norm": 0.5, "lr": 1e-3 * min(1, step / 3),
                          "samples_per_s": 4 / step_time, "tokens_per_s": 240.0 * 4 / step_time,
                          "step_time_s": step_time, "data_wait_s": 0.01, "peak_memory_gib": 1.5 + step / 100,
                          "samples_seen": 4 * step})
    writer.close()


def test_report_writes_plots_and_summary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 30)
    result = run_cli("report", str(run), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    for name in ("loss", "throughput", "memory", "lr"):
        image = Image.open(run / "report" / f"{name}.png")
        assert image.size[0] > 300 and image.size[1] > 200, name
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["loss_falls"] is True
    assert summary["peak_memory_gib"] == pytest.approx(1.8)
    # Throughput is total samples over total time of the steady steps (2..30, step 1 includes warm-up), not the
    # plain mean of the per-step rates, which overweights the fast steps.
    steady = range(2, 31)
    time_weighted = 4 * len(steady) / sum(_step_time(s) for s in steady)
    plain_mean = float(np.mean([4 / _step_time(s) for s in steady]))
    assert summary["samples_per_s"] == pytest.approx(time_weighted)
    assert summary["samples_per_s"] != pytest.approx(plain_mean, rel=0.05)
    assert summary["tokens_per_s"] == pytest.approx(240 * time_weighted)
    assert "falling" in (run / "report" / "summary.txt").read_text() and "samples/s" in result.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_cli("report", str(empty), timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_report_skips_a_torn_last_metrics_line(tmp_path):
    """A run still writing (or killed mid-write) leaves half a line at the end: the report uses the whole lines."""
    from cogvx_dist.train.metrics import METRICS_FILE, read_metrics
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 6)
    with open(run / METRICS_FILE, "a") as handle:
        handle.write('{"step": 7, "loss": 1.2, "samples_')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    summary = write_report(run)
    assert summary["steps"] == 6 and summary["last_step"] == 6


@pytest.mark.parametrize("bad,message", [
    ('{"step": 3, "loss": ', "line 3: not JSON"),  # torn, but not the last line: the file is damaged
    ("[1, 2]", "line 3: expected a JSON object, got list"),
    ('{"loss": 1.0}', 'line 3: no integer "step"'),
])
def test_report_names_file_and_line_of_a_bad_metrics_line(tmp_path, bad, message):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.train.metrics import METRICS_FILE, read_metrics
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": 1, "loss": 1.0}), json.dumps({"step": 2, "loss": 0.9}), bad,
             json.dumps({"step": 4, "loss": 0.8})]
    (run / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(CogvxError, match=f"{METRICS_FILE} {message}"):
        read_metrics(run)
    with pytest.raises(CogvxError, match=message):
        write_report(run)


@pytest.mark.parametrize("name,text", [("train_summary.json", '{"world_size": 2'),
                                       ("train_summary.json", "[]"),
                                       ("validation/validated.json", "not json")])
def test_report_names_a_broken_run_file(tmp_path, name, text):
    from cogvx_dist.core.errors import CogvxError
    from cogvx_dist.results.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run, 3)
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(text)
    with pytest.raises(CogvxError, match=re.escape(f"{run / name}: ")):
        write_report(run)
    result = run_cli("report", str(run), timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(run / name) in result.stderr


@pytest.mark.slow
def test_demo_end_to_end_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--clips", "4", "--steps", "4", "--inference-steps", "2",
                     timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())

    assert (out / "model" / "model_index.json").is_file()  # tiny checkpoint
    assert len(list((out / "data").glob("*.mp4"))) == 4  # synthetic clips with captions
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 4
    assert {json.loads(p.read_text())["rank"] for p in (out / "shards" / "parts").glob("rank-*.json")} == {0, 1}
    # The prep numbers are read from what prep wrote (manifest, per-rank stats), not scraped from its logs.
    prep = summary["numbers"]["prep"]
    parts = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["stats"]
             for p in (out / "shards" / "parts").glob("rank-*.json")}
    assert prep["samples"] == 4 and prep["shards"] == len(manifest["shards"])
    assert [(r["rank"], r["encoded"], r["seconds"]) for r in prep["per_rank"]] == \
        [(rank, parts[rank]["encoded"], parts[rank]["seconds"]) for rank in (0, 1)]
    assert prep["videos_per_s"] == pytest.approx(4 / max(s["seconds"] for s in parts.values()), abs=1e-3)
    train_summary = json.loads((out / "run" / "train_summary.json").read_text())
    assert train_summary["world_size"] == 2 and train_summary["steps"] == 4
    assert (out / "run" / "lora" / LORA_WEIGHTS_NAME).is_file()

    without, with_lora = decode_mp4(out / "samples" / "without_lora.mp4"), decode_mp4(out / "samples" / "with_lora.mp4")
    assert without.shape == with_lora.shape and without.shape[0] == 9
    assert np.abs(without.astype(float) - with_lora.astype(float)).mean() > 0.1
    assert summary["numbers"]["sample"]["clips_differ"] is True

    from PIL import Image

    assert Image.open(out / "loss_curve.png").size[0] > 300
    for name in ("loss", "throughput", "memory", "lr"):
        assert (out / "run" / "report" / f"{name}.png").is_file()
    assert summary["numbers"]["train"]["validated_steps"] == [1, 2, 3, 4]
    assert summary["numbers"]["prep"]["videos_per_s"] > 0 and summary["numbers"]["train"]["samples_per_s"] > 0
    text = (out / "summary.md").read_text()
    for words in ("videos/s", "samples/s", "mean abs pixel difference", "cogvx train --config"):
        assert words in text, words

    # Running it again into the same folder replaces the earlier demo; an unrelated folder is refused.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused = run_cli("demo", "--out", str(other), "--clips", "2", "--steps", "1")
    assert refused.returncode == 2 and "not an earlier demo" in refused.stderr
    assert (other / "keep.txt").is_file()
