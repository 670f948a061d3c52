"""The memory plan as a training run meets it: `cogvx train` and rank 0 refuse a run predicted not to fit before any
rank loads weights, --no-plan-check overrides, a fitting run logs its plan, and `cogvx plan --calibrate` reads the
throughput of a finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx_dist.core.run_folder import RunFolder
from tests.helpers import REPO, assert_one_line_error, clean_env, free_port, launch, run_cli, short_run_config

LAUNCHERS = REPO / "launchers"
SMALL_GPU = "plan.gpu_memory=2GiB"
"""Less than the tiny float32 model needs under ZeRO-2 (its two 200M-element reduce buckets), more than ZeRO-3."""


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards((4, 3))


def test_cogvx_train_refuses_a_run_predicted_not_to_fit_and_names_the_change(shards, tmp_path):
    config, output = short_run_config(tmp_path, *shards)
    result = launch(config, 2, SMALL_GPU)
    assert_one_line_error(result.returncode, result.stderr, "memory plan: each rank needs", "its GPU has 2.00 GiB",
                          "the cheapest change that fits is deepspeed.config: zero3", "--no-plan-check")
    assert not RunFolder(output).run_config.exists()  # no rank started


def test_rank_zero_refuses_before_any_rank_loads_weights_under_torchrun(shards, tmp_path):
    """Launched without `cogvx train` (torchrun, CHECK=0), rank 0 checks the plan before the rendezvous; rank 1
    waits there and goes down with the job."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun next to the interpreter")
    config, output = short_run_config(tmp_path, *shards)
    result = subprocess.run(["bash", str(LAUNCHERS / "train_torchrun.sh"), str(config), SMALL_GPU], cwd=REPO,
                            text=True, capture_output=True, timeout=600,
                            env=clean_env(NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", CHECK="0",
                                          MASTER_PORT=str(free_port()), TORCHRUN=str(torchrun)))
    assert result.returncode != 0
    assert "cogvx train: error: memory plan: each rank needs" in result.stderr
    record = json.loads(RunFolder(output).failure(0).read_text())
    assert "memory plan" in record["message"]
    assert not RunFolder(output).run_config.exists()  # no rank built its trainer


def test_a_fitting_run_logs_its_plan_and_calibrates_the_step_time(shards, tmp_path):
    config, output = short_run_config(tmp_path, *shards)
    result = launch(config, 2, "plan.gpu_memory=80GiB", "train.max_steps=3", "checkpoint.every_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory plan: each rank needs" in result.stdout and "of its GPU's 80.00 GiB" in result.stdout
    planned = run_cli("plan", "--config", str(config), "--calibrate", str(output), "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    measured = report["calibration"]["step_time_s"]
    # The run's own configuration at the run's own throughput takes the run's own step time.
    assert report["plan"]["seconds_per_step"] == pytest.approx(measured, rel=1e-6)
    assert report["calibration"]["windows"] == 2  # the first log window (warm-up) is left out


def test_no_plan_check_starts_a_run_predicted_not_to_fit(shards, tmp_path):
    config, output = short_run_config(tmp_path, *shards)
    result = launch(config, 2, "--no-plan-check", SMALL_GPU, "train.max_steps=2", "checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory plan" not in result.stdout + result.stderr
    assert json.loads(RunFolder(output).summary.read_text())["world_size"] == 2
