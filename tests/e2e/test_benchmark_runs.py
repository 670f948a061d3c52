"""The benchmark scripts run end to end and report every field (their numbers are not judged: no wall-clock limits).

The full-size prep path normally needs a GPU; its CPU smoke run (full-size VAE config at a small clip size, one
T5-XXL-width layer) runs the code a GPU machine runs, so it cannot rot where no GPU is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

BENCH = REPO / "benchmarks" / "bench_prep.py"
TRAIN_BENCH = REPO / "benchmarks" / "bench_train.py"


def run_bench(*args: str, temporary: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(temporary)} if temporary else None
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900, env=env)


def test_full_size_benchmark_smoke_on_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    run = run_bench("--full-size", "--device", "cpu", "--clip", "9x32x48", "--t5-layers", "1", "--count", "2",
                    "--variants", "eager,channels_last+batch2", "--json", str(report_path), temporary=temporary)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not [p.name for p in temporary.iterdir() if p.name.startswith("bench-prep")]  # its clips went with it
    report = json.loads(report_path.read_text())
    assert report["clip"].startswith("9x32x48") and report["t5"]["s_per_video"] > 0
    eager, fast = report["variants"]["eager"], report["variants"]["channels_last+batch2"]
    for variant in (eager, fast):
        assert "error" not in variant, variant
        assert variant["latent_shape"] == [16, 3, 4, 6]  # full-size VAE: 16 channels, 8x spatial, 4x temporal
        assert set(variant["s_per_video"]) == {"vae", "write", "decode_wait", "pipelined"}
    assert fast["mean_max_abs_diff"] < 1e-3  # same weights, same clip: only the memory layout differs
    assert report["best"]["variant"] in report["variants"] and report["best"]["meets_target"] is False  # not a GPU


def test_train_benchmark_runs_cogvx_train_and_reads_its_metrics(tmp_path):
    run = subprocess.run([sys.executable, str(TRAIN_BENCH), "--steps", "5", "--warmup", "2", "--json",
                          str(tmp_path / "report.json"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["returncode"] == 0 and report["steps_timed"] == 3  # steps 3, 4, 5
    assert report["s_per_step_median"] > 0 and report["tokens_per_s_median"] > 0
    assert report["geometry"] == "9x32x48" and report["lora"] == {"rank": 8, "alpha": 8.0}
    assert json.loads((tmp_path / "work" / "ds.json").read_text())["optimizer"]["params"]["torch_adam"] == "auto"
    assert (tmp_path / "work" / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # A second case on the same checkpoint, with a run-config override, as the device script runs its cases.
    model_written = (tmp_path / "work" / "model" / "model_index.json").stat().st_mtime_ns
    case = subprocess.run([sys.executable, str(TRAIN_BENCH), "--steps", "3", "--warmup", "1", "--work",
                           str(tmp_path / "work"), "--reuse-model", "--case", "math", "--set",
                           "model.attention_backend=math", "--json", str(tmp_path / "math.json")],
                          capture_output=True, text=True, timeout=900)
    assert case.returncode == 0, case.stderr[-2000:]
    math_report = json.loads((tmp_path / "math.json").read_text())
    assert math_report["case"] == "math" and math_report["attention"] == "math"
    assert (tmp_path / "work" / "run-math" / "metrics.jsonl").is_file()
    assert (tmp_path / "work" / "model" / "model_index.json").stat().st_mtime_ns == model_written
