"""log.trackers with the real trackers: a 2-rank run logging to TensorBoard, Weights & Biases (offline, into the run
folder) and MLflow (its SQLite store in the run folder), then resumed; what each recorded is read back from its own
files and compared with metrics.jsonl and run_config.json. No network: wandb is offline and both trackers' telemetry
and error reporting are off."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from cogvx_dist.core.metric_table import read_metrics, tensorboard_tag
from tests.helpers import REPO, clean_env, free_port, mlflow_importable, mlflow_python, write_config

NO_NETWORK = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
              "DO_NOT_TRACK": "true"}
"""What keeps both trackers off the network (and the test from waiting on one that is not there)."""


def tracker_env(home: Path) -> dict[str, str]:
    """A clean environment in which the trackers write only below `home` and the run folder, talking to no one.
    The ranks run in the MLflow environment, which is this one plus mlflow: they load the DeepSpeed ops this one
    built, with its ninja (otherwise one folder per environment: a rebuild)."""
    from cogvx_dist.train.engine import extensions_dir

    env = clean_env(**NO_NETWORK, WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                    WANDB_DATA_DIR=str(home / "data"), TORCH_EXTENSIONS_DIR=str(extensions_dir()),
                    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, in the run folder
    return env


def wandb_records(path: Path) -> list[Any]:
    """The records of a wandb transaction log (run-ID.wandb), decoded with wandb's own protobuf schema.

    The file is LevelDB's log format (32 KiB blocks of CRC-checked chunks) after a 7-byte header (":W&B", magic,
    version). wandb 0.31 reads it only in its Go core, so this reads it the way that documented format says."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, chunks, position, block = [], [], 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's trailer: too short for a chunk header
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if (checksum, length, kind) == (0, 0, 0):
            break
        body = data[position + 7:position + 7 + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad chunk at {position}"
        chunks.append(body)
        position += 7 + length
        if kind in (1, 4):  # FULL, or the LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wandb_run(folder: Path) -> dict[str, Any]:
    """One offline run folder read back: its id, project, name, config, history by step, last summary, finished."""
    (log,) = folder.glob("run-*.wandb")
    run: dict[str, Any] = {"history": {}, "summary": {}, "finished": False}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                       config={item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            run["history"][record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            run["summary"].update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                   for item in record.summary.update})
        elif kind == "exit":
            run["finished"] = True
    run["config"].pop("_wandb", None)
    return run


def expected_scalars(output: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl's numbers per step, under the names the trackers log them (TensorBoard's tags)."""
    return {record["step"]: {tensorboard_tag(k): v for k, v in record.items()
                             if k != "step" and isinstance(v, (int, float))}
            for record in read_metrics(output)}


@pytest.mark.slow
def test_trackers_record_the_metrics_and_config_of_rank_0_and_a_resume_continues_their_runs(synthetic_shards,
                                                                                             tmp_path):
    mlflow_importable()  # to read the run back here; `cogvx train` runs in the environment that has mlflow
    from mlflow.tracking import MlflowClient

    model, shards = synthetic_shards((3, 3, 2))
    output = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model, shards, output, train={"max_steps": 4},
                          checkpoint={"every_steps": 2}, data={"eval_shards": str(shards)},
                          log={"sample_trace": False, "trackers": ["tensorboard", "wandb", "mlflow"],
                               "project": "cogvx-test", "eval_every_steps": 2, "eval_timesteps": [100, 700]})
    env = tracker_env(tmp_path / "home")

    def train(*overrides: str) -> None:
        result = subprocess.run([str(mlflow_python()), "-m", "cogvx_dist", "train", "--config", str(config),
                                 "--nproc", "2", "--master-port", str(free_port()), *overrides], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    train()
    expected = expected_scalars(output)
    assert sorted(expected) == [0, 1, 2, 3, 4]  # step 0: the held-out loss before any update
    assert "eval/loss_t700" in expected[2] and "train/loss" in expected[4]
    run_config = json.loads((output / "run_config.json").read_text())
    recorded = json.loads((output / "trackers.json").read_text())

    # Weights & Biases: one offline run for the two ranks, holding every step's numbers and the whole config.
    (first,) = sorted((output / "wandb").glob("offline-run-*"))
    wandb = wandb_run(first)
    assert (wandb["id"], wandb["project"], wandb["name"]) == (recorded["wandb"]["id"], "cogvx-test", "run")
    assert wandb["history"] == expected
    assert wandb["config"] == run_config
    assert wandb["summary"]["train/attention"] == read_metrics(output)[-1]["attention"]
    assert wandb["finished"]

    # MLflow: one run in the run folder's store, the same numbers per step, the config as params and as a file.
    client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cogvx-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == recorded["mlflow"]["id"] and run.info.status == "FINISHED"

    def mlflow_history() -> dict[int, dict[str, float]]:
        steps: dict[int, dict[str, float]] = {}
        for key in client.get_run(run.info.run_id).data.metrics:
            for point in client.get_metric_history(run.info.run_id, key):
                steps.setdefault(point.step, {})[key] = point.value
        return steps

    assert mlflow_history() == expected
    params = run.data.params
    assert params["train.max_steps"] == "4" and params["model.path"] == str(model)
    assert params["log.trackers"] == '["tensorboard", "wandb", "mlflow"]'
    assert {key.split(".")[0] for key in params} == set(run_config)
    assert run.data.tags["train/attention"] == read_metrics(output)[-1]["attention"]
    logged = client.download_artifacts(run.info.run_id, "run_config.json", str(tmp_path / "artifact"))
    assert json.loads(Path(logged).read_text()) == run_config
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))

    # A longer run resumed from the step-4 checkpoint goes on in the same MLflow run and under the same wandb id
    # (wandb keeps one offline folder per start; `wandb sync` joins them). MLflow keeps a param as first logged.
    train("train.max_steps=6")
    expected = expected_scalars(output)
    assert sorted(expected) == [0, 1, 2, 3, 4, 5, 6]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == recorded["mlflow"]["id"] and run.info.status == "FINISHED"
    assert mlflow_history() == expected
    assert run.data.params["train.max_steps"] == "4"
    logged = client.download_artifacts(run.info.run_id, "run_config.json", str(tmp_path / "artifact-2"))
    assert json.loads(Path(logged).read_text())["train"]["max_steps"] == 6
    first_again, second = sorted((output / "wandb").glob("offline-run-*"))
    assert first_again == first
    resumed = wandb_run(second)
    assert resumed["id"] == wandb["id"] and resumed["finished"]
    assert resumed["history"] == {step: expected[step] for step in (5, 6)}
    assert resumed["config"]["train"]["max_steps"] == 6
