"""The benchmark scripts run and report every field (their numbers are not judged here: no wall-clock limits).

The full-size path normally needs a GPU; its CPU smoke run (full-size VAE config at a small clip size, one T5-XXL-
width layer) keeps the code that the GPU session will run from rotting between sessions that have one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prep.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900)


def test_tiny_benchmark_reports_the_stage_split(tmp_path):
    run = run_bench("--count", "3", "--json", str(tmp_path / "report.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["videos"] == 3 and report["videos_per_s"] > 0
    assert set(report["s_per_video"]) >= {"decode", "decode_wait", "t5", "vae", "write"}
    assert report["source"].endswith("-> 9x32x48")


@pytest.mark.slow
def test_full_size_benchmark_smoke_on_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    run = run_bench("--full-size", "--device", "cpu", "--clip", "9x64x96", "--t5-layers", "1", "--count", "2",
                    "--variants", "eager,channels_last+batch2", "--json", str(report_path))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["clip"].startswith("9x64x96") and report["t5"]["s_per_video"] > 0
    eager, fast = report["variants"]["eager"], report["variants"]["channels_last+batch2"]
    for variant in (eager, fast):
        assert "error" not in variant, variant
        assert variant["latent_shape"] == [16, 3, 8, 12]  # full-size VAE: 16 channels, 8x spatial, 4x temporal
        assert set(variant["s_per_video"]) == {"vae", "write", "decode_wait", "pipelined"}
    assert fast["mean_max_abs_diff"] < 1e-3  # same weights, same clip: only the memory layout differs
    assert report["best"]["variant"] in report["variants"] and report["best"]["meets_target"] is False  # not a GPU


def test_unknown_variant_is_one_line():
    run = run_bench("--full-size", "--device", "cpu", "--variants", "eager,turbo")
    assert run.returncode != 0 and "unknown variant part 'turbo'" in run.stderr
    assert "Traceback" not in run.stderr


TRAIN_BENCH = BENCH.parent / "bench_train.py"


@pytest.mark.slow
def test_train_benchmark_runs_cogvx_train_and_reads_its_metrics(tmp_path):
    run = subprocess.run([sys.executable, str(TRAIN_BENCH), "--steps", "5", "--warmup", "2", "--json",
                          str(tmp_path / "report.json"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["returncode"] == 0 and report["steps_timed"] == 3  # steps 3, 4, 5
    assert report["s_per_step_median"] > 0 and report["tokens_per_s_median"] > 0
    assert report["geometry"] == "9x32x48" and report["lora"] == {"rank": 8, "alpha": 8.0}
    assert json.loads((tmp_path / "work" / "ds.json").read_text())["optimizer"]["params"]["torch_adam"] is True
    assert (tmp_path / "work" / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_full_size_train_checkpoint_passes_the_trainer_preflight(tmp_path):
    """The GPU benchmark's checkpoint (released config, random weights; one block here) is one the trainer takes."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_train import write_train_checkpoint

    from cogvx_dist.core.config_files import load_config
    from cogvx_dist.core.synthetic_shards import write_synthetic_shards
    from cogvx_dist.core.loading import describe_checkpoint
    from cogvx_dist.train.config import RunConfig
    from cogvx_dist.train.loop import preflight

    model = write_train_checkpoint(tmp_path / "model", "CogVideoX-2b", "cpu", num_layers=1)
    info = describe_checkpoint(model)
    assert info.family.name == "CogVideoX-2b" and (info.frames, info.height, info.width) == (49, 480, 720)
    assert info.transformer_config["num_attention_heads"] == 30 and info.transformer_config["num_layers"] == 1
    write_synthetic_shards(tmp_path / "shards", model, [1])
    checks = preflight(load_config(RunConfig, None, [f"model.path={model}", f"data.shards={tmp_path / 'shards'}"]))
    assert checks.manifest.latent_frames == 13 and checks.manifest.sizes() == [(480, 720)]
