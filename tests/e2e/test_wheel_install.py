"""The project as a user installs it: a wheel built from the checkout (`pip wheel`, as the Dockerfile's first stage
does) installed into a fresh virtual environment, with no source checkout on the path, runs `cogvx demo` end to
end at reduced size (prep, DeepSpeed training with the named `zero2` config shipped in the wheel, sampling,
report)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from cogvx_dist.core.lora import LORA_WEIGHTS_NAME
from cogvx_dist.train.engine import extensions_dir
from tests.helpers import REPO, clean_env, decode_mp4, shared_folder


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; the dependencies come from this environment's site-packages as a
    plain path (so its editable install of cogvx-dist is not seen). Made once per session."""
    def build(root: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(REPO), "-w",
                        str(root / "wheels")], check=True, capture_output=True, timeout=600)
        (wheel,) = (root / "wheels").glob("cogvx_dist-*.whl")
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
        purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                       "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                      check=True, capture_output=True, text=True).stdout.strip())
        (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                        "--no-deps", str(wheel)], check=True, capture_output=True, timeout=600)

    return shared_folder(tmp_path_factory, "wheel-venv", build) / "venv"


def test_the_wheel_ships_the_deepspeed_configs(venv, tmp_path):
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "from cogvx_dist.train.ds_config import DS_CONFIG_DIR, "
                            "load_ds_config; print(DS_CONFIG_DIR); print(load_ds_config('zero2')['zero_optimization']"
                            "['stage'])"], cwd=tmp_path, env=clean_env(PYTHONPATH=""), capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    folder, stage = found.stdout.split()
    assert Path(folder).resolve().is_relative_to(venv.resolve()) and stage == "2"


def test_demo_end_to_end_from_the_wheel_at_reduced_size(venv, tmp_path):
    out = tmp_path / "demo"
    # The DeepSpeed op this environment built already (one folder per environment otherwise: a rebuild).
    env = clean_env(PYTHONPATH="", TORCH_EXTENSIONS_DIR=str(extensions_dir()))
    result = subprocess.run([str(venv / "bin" / "cogvx"), "demo", "--out", str(out), "--clips", "4", "--steps", "4",
                             "--inference-steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
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
    refused = subprocess.run([str(venv / "bin" / "cogvx"), "demo", "--out", str(other), "--clips", "2", "--steps", "1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not an earlier demo" in refused.stderr
    assert (other / "keep.txt").is_file()
