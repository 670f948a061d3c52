"""Results as users run them: `cogvx sample` with and without a trained adapter, and `cogvx sample --watch` beside a
run that commits checkpoints. The whole `cogvx demo` runs from a wheel install in test_wheel_install.py."""

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
