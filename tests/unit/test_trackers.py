"""log.trackers settings: names, the older log.tensorboard switch, and the pre-flight's word on a tracker that is not
installed (a package hidden the way Python hides one: sys.modules[name] = None). The trackers themselves, run for
real, are in tests/e2e/test_trackers.py. MLflow comes from its own environment (tests/mlflow_env.py)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from cogvx_dist.core.config_files import load_config
from cogvx_dist.train.config import RunConfig
from tests.helpers import assert_one_line_error, cli, mlflow_importable, write_config

PLACES = ["model.path=tiny", "data.shards=shards"]
"""What validation asks for; these tests never read them."""


@pytest.mark.parametrize("overrides, names", [
    ([], ["tensorboard"]),
    (["log.tensorboard=false"], []),  # how existing configs turn TensorBoard off
    (["log.tensorboard=true"], ["tensorboard"]),
    (["log.trackers=[wandb, mlflow]"], ["wandb", "mlflow"]),
    (["log.trackers=[wandb]", "log.tensorboard=true"], ["tensorboard", "wandb"]),
    (["log.trackers=[tensorboard, mlflow]", "log.tensorboard=false"], ["mlflow"]),
    (["log.trackers=[]"], []),
])
def test_the_trackers_in_use_keep_what_log_tensorboard_meant(overrides, names):
    assert load_config(RunConfig, None, [*PLACES, *overrides]).log.tracker_names() == names


def test_metrics_go_to_tensorboard_only_where_it_is_in_use(tmp_path):
    from cogvx_dist.train.metrics import MetricsWriter

    for overrides, written in (([], True), (["log.tensorboard=false"], False), (["log.trackers=[]"], False)):
        output = tmp_path / str(len(list(tmp_path.iterdir())))
        output.mkdir()  # as the trainer's rank 0 makes it, with run_config.json, before the first step
        config = load_config(RunConfig, None, [*PLACES, f"output_dir={output}", *overrides])
        writer = MetricsWriter.for_run(config, enabled=True)
        writer.log(1, {"loss": 0.5, "attention": "math"})
        writer.close()
        assert (output / "metrics.jsonl").is_file()
        assert (output / "tensorboard").is_dir() == written, overrides
        assert not (output / "trackers.json").exists()  # no tracker run to record


@pytest.mark.parametrize("overrides, hidden, message", [
    (["log.trackers=[tensorboard, neptune]"], None,
     "log.trackers[1] must be one of 'tensorboard', 'wandb', 'mlflow', got 'neptune'"),
    (["log.trackers=[wandb, mlflow, wandb]"], None, "log.trackers names 'wandb' twice"),
    (["log.wandb_mode=cloud"], None, "log.wandb_mode must be one of 'offline', 'online', got 'cloud'"),
    (["log.trackers=[tensorboard, wandb]"], "wandb",
     "log.trackers: wandb needs the 'wandb' package, which is not installed here; pip install 'cogvx-dist[trackers]'"),
    (["log.trackers=[mlflow]"], "mlflow", "log.trackers: mlflow needs the 'mlflow' package"),
    (["log.trackers=[mlflow]"], "sqlalchemy", "mlflow needs the 'sqlalchemy' package, which is not installed here; "
                                              "pip install 'cogvx-dist[trackers]'"),
])
def test_a_tracker_that_is_unknown_or_not_installed_is_one_line_before_training(
        synthetic_shards, tmp_path, capsys, monkeypatch, overrides, hidden, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow_importable()
    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)  # what an uninstalled package looks like to the import system
    model, shards = synthetic_shards((2, 1))
    config = write_config(tmp_path / "run.yaml", model, shards, tmp_path / "out")
    code, _, err = cli(capsys, "train", "--config", str(config), "--nproc", "2", *overrides)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_mlflow_on_a_tracking_server_needs_no_local_store_packages(synthetic_shards, tmp_path, monkeypatch):
    """With MLFLOW_TRACKING_URI set the run folder's SQLite store is not used, so SQLAlchemy is not asked for."""
    from cogvx_dist.train.preflight import preflight

    mlflow_importable()
    model, shards = synthetic_shards((2, 1))
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    overrides = [f"model.path={model}", f"data.shards={shards}", f"output_dir={tmp_path / 'out'}",
                 "log.trackers=[mlflow]"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    preflight(load_config(RunConfig, None, overrides))


def test_a_tracker_that_fails_mid_run_is_dropped_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, capfd):
    """The MLflow run is deleted behind the writer's back (as someone cleaning up the store might): MLflow then
    refuses every write to it; training is not stopped, one warning says so, and metrics.jsonl keeps every step."""
    mlflow_importable()
    from mlflow.tracking import MlflowClient

    from cogvx_dist.core.metric_table import read_metrics
    from cogvx_dist.train.metrics import MetricsWriter

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    output = tmp_path / "run"
    output.mkdir()
    config = load_config(RunConfig, None, [*PLACES, f"output_dir={output}", "log.trackers=[mlflow]"])
    writer = MetricsWriter.for_run(config, enabled=True)
    writer.log(1, {"loss": 0.5})
    client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((output / "trackers.json").read_text())["mlflow"]["id"]
    while not client.get_metric_history(run_id, "train/loss"):  # step 1 is sent from the writer's own thread
        time.sleep(0.05)
    client.delete_run(run_id)
    capfd.readouterr()
    writer.log(2, {"loss": 0.25})
    writer.log(3, {"loss": 0.125})
    writer.close()
    warnings = [line for line in capfd.readouterr().err.splitlines() if "log.trackers" in line]
    assert len(warnings) == 1 and "mlflow failed at step 2" in warnings[0], warnings
    assert [record["step"] for record in read_metrics(output)] == [1, 2, 3]
    assert [point.step for point in client.get_metric_history(run_id, "train/loss")] == [1]
