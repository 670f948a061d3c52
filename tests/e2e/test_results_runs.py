"""Results as users run them: `cogvx sample` with and without a trained adapter, `cogvx sample --watch` beside a run
that commits checkpoints, and the whole `cogvx demo` at reduced size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cogvx_dist.core.lora import LORA_WEIGHTS_NAME
from cogvx_dist.core.run_folder import RunFolder
from tests.helpers import REPO, decode_mp4, make_adapter, run_cli, write_checkpoint


@pytest.fixture(scope="module")
def model_2b(tiny_checkpoint) -> Path:
    return tiny_checkpoint("CogVideoX-2b")


def test_sample_with_and_without_lora_differ(model_2b, tmp_path):
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


def test_watch_samples_a_checkpoint_committed_while_it_runs(model_2b, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": {"path": str(model_2b)}}))  # model from the run
    write_checkpoint(run, model_2b, step=2, seed=2)
    # An uncommitted folder (a save in progress) must be ignored.
    (RunFolder(run).checkpoint(3) / "lora").mkdir(parents=True)

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
        assert (folder / "lora" / LORA_WEIGHTS_NAME).is_file()  # the adapter that made them
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
