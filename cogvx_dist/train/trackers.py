"""Experiment trackers beyond TensorBoard (log.trackers): Weights & Biases and MLflow, on rank 0 only.

Each gets what metrics.jsonl gets, under the metric's TensorBoard tag (`train/loss`, `eval/loss_t500`; the table is
core/metric_table.py), at the same optimizer step, and the resolved run config (run_config.json) as the run's config
(wandb) or params (MLflow, flattened to `section.key`). Text metrics (the attention kernel) go to wandb's summary and
MLflow's tags, since neither draws a curve of text.

Where they write, with no network unless asked for:
- wandb: output_dir/wandb/ (offline by default, log.wandb_mode; `wandb sync` uploads it later);
- MLflow: MLFLOW_TRACKING_URI when set, else a SQLite store in output_dir/mlflow/ (mlflow.db, artifacts/).

RUN/trackers.json records each tracker's run id, so that a resumed run continues the same wandb and MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.train.config import LogConfig

EXTRA = "trackers"
"""The pip extra that installs wandb and MLflow: `pip install 'cogvx-dist[trackers]'`."""
RECORD = "trackers.json"
"""RUN/trackers.json: each tracker's run id, for a resume to continue it."""
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
CLOSE_TIMEOUT_S = 120.0
"""How long the end of a run waits for the trackers to take the last metrics and end their runs."""
_MLFLOW_PARAM_LENGTH = 6000
"""MLflow's longest param value; longer ones are cut (run_config.json, logged whole as an artifact, has them)."""


def required_modules(name: str) -> list[str]:
    """The modules tracker `name` imports (MLflow's SQLite store needs SQLAlchemy and Alembic beside it)."""
    if name == "wandb":
        return ["wandb"]
    if name == "mlflow":
        return ["mlflow"] if os.environ.get(MLFLOW_URI_ENV) else ["mlflow", "sqlalchemy", "alembic"]
    return []


def check_trackers(settings: LogConfig) -> None:
    """Pre-flight: each tracker named once, and its package importable (one line naming the pip extra if not)."""
    named = list(settings.trackers)
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise CogvxError(f"log.trackers names {twice[0]!r} twice")
    for name in settings.tracker_names():
        missing = [module for module in required_modules(name) if importlib.util.find_spec(module) is None]
        if missing:
            raise CogvxError(f"log.trackers: {name} needs the {missing[0]!r} package, which is not installed here; "
                             f"pip install 'cogvx-dist[{EXTRA}]' on every node")


class Tracker(Protocol):
    """One tracker's run: rank 0 logs into it and closes it when training ends."""

    name: str
    id: str
    """The tracker's own run id."""

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None: ...

    def close(self) -> None: ...


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested run config as `section.key` -> text (lists and mappings below the sections as JSON)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not prefix:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value)
    return params


class WandbRun:
    """A Weights & Biases run writing into output_dir/wandb/."""

    name = "wandb"

    def __init__(self, root: Path, settings: LogConfig, run_config: dict[str, Any], resume_id: str | None) -> None:
        import wandb

        self._run = wandb.init(project=settings.project, name=settings.run_name or root.resolve().name,
                               dir=str(root), mode=settings.wandb_mode, config=run_config, id=resume_id,
                               resume="allow" if resume_id else None)
        self.id: str = self._run.id
        self._texts: dict[str, str] = {}

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        self._run.log(scalars, step=step)
        changed = {key: value for key, value in texts.items() if self._texts.get(key) != value}
        if changed:
            self._run.summary.update(changed)
            self._texts.update(changed)

    def close(self) -> None:
        self._run.finish()


class MlflowRun:
    """An MLflow run: in MLFLOW_TRACKING_URI's store when set, else in output_dir/mlflow/mlflow.db."""

    name = "mlflow"

    def __init__(self, root: Path, settings: LogConfig, run_config: dict[str, Any], resume_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        folder = (root / MLFLOW_DIR).resolve()
        self.uri = os.environ.get(MLFLOW_URI_ENV) or f"sqlite:///{folder / 'mlflow.db'}"
        local = not os.environ.get(MLFLOW_URI_ENV)
        if local:
            folder.mkdir(parents=True, exist_ok=True)
        with _quiet_mlflow():  # the store's first use creates its tables and says so at length
            self._client = MlflowClient(tracking_uri=self.uri)
            experiment = self._client.get_experiment_by_name(settings.project)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(
                settings.project, artifact_location=(folder / "artifacts").as_uri() if local else None)
        known = self._resumable(resume_id)
        if known is not None:
            self.id = resume_id
            self._client.update_run(self.id, status="RUNNING")
        else:
            run = self._client.create_run(experiment_id, run_name=settings.run_name or root.resolve().name)
            self.id, known = run.info.run_id, {}
        # A param cannot change in MLflow: a resume that changed the config (a longer max_steps) adds only the new
        # keys; run_config.json, logged again, is the config the run went on with.
        params = [Param(key, value[:_MLFLOW_PARAM_LENGTH]) for key, value in flat_params(run_config).items()
                  if key not in known]
        for start in range(0, len(params), 100):  # log_batch takes 100 params at a time
            self._client.log_batch(self.id, params=params[start:start + 100])
        self._client.log_dict(self.id, run_config, "run_config.json")
        self._texts: dict[str, str] = {}

    def _resumable(self, run_id: str | None) -> dict[str, str] | None:
        """The params of the recorded run to go on with, or None where there is none in this store."""
        if not run_id:
            return None
        try:
            return dict(self._client.get_run(run_id).data.params)
        except Exception:  # MLflow says "not found" by raising: then a new run it is
            return None

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        changed = {key: value for key, value in texts.items() if self._texts.get(key) != value}
        self._client.log_batch(self.id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()],
                               tags=[RunTag(key, value) for key, value in changed.items()])
        self._texts.update(changed)

    def close(self) -> None:
        self._client.set_terminated(self.id, "FINISHED")


class _quiet_mlflow:
    """MLflow's and Alembic's INFO lines and SQLAlchemy's deprecation warnings, held back while a store opens."""

    def __enter__(self) -> None:
        self._loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(logging.WARNING)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)

    def __exit__(self, *exc: Any) -> None:
        self._warnings.__exit__(*exc)
        for logger, level in zip(self._loggers, self._levels):
            logger.setLevel(level)


_OPENERS = {"wandb": WandbRun, "mlflow": MlflowRun}


def open_trackers(output_dir: str | Path, settings: LogConfig, run_config: dict[str, Any],
                  resume_step: int) -> list[Tracker]:
    """Start (or, on a resume, continue) the run of each tracker in log.trackers but TensorBoard; rank 0 only."""
    root = Path(output_dir)
    record_path = root / RECORD
    recorded = {}
    if resume_step and record_path.is_file():
        recorded = json.loads(record_path.read_text())
    opened: list[Tracker] = []
    for name in settings.tracker_names():
        if name not in _OPENERS:
            continue
        entry = recorded.get(name) or {}
        try:
            tracker = _OPENERS[name](root, settings, run_config, entry.get("id"))
        except Exception as err:
            raise CogvxError(f"log.trackers: {name} could not start a run: {type(err).__name__}: {err}") from err
        opened.append(tracker)
        recorded[name] = {"id": tracker.id, **({"tracking_uri": tracker.uri} if isinstance(tracker, MlflowRun) else {})}
    if opened:
        write_atomic(record_path, json.dumps(recorded, indent=2) + "\n")
    return opened



class TrackerFeed:
    """Hands each log step to the trackers from a thread of its own, so a training step never waits on one (an
    MLflow SQLite commit took 10-70 ms on the test machine, wandb's hand-off several ms). A tracker that raises is
    dropped with a warning: metrics.jsonl, written by the training thread, has every step."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self._trackers = list(trackers)
        self._queue: queue.Queue[tuple[int, dict[str, float], dict[str, str]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="cogvx-trackers", daemon=True)
        self._thread.start()

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        """Queue one log step for every tracker."""
        self._queue.put((step, dict(scalars), dict(texts)))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Let the trackers take what is queued and end their runs; give up on them after `timeout_s`."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            rank_logger("cogvx.train", 0).warning(
                "log.trackers: %s still busy %.0f s after training ended; leaving it (metrics.jsonl has every step)",
                ", ".join(tracker.name for tracker in self._trackers), timeout_s)

    def _send(self) -> None:
        while (item := self._queue.get()) is not None:
            for tracker in list(self._trackers):
                self._call(tracker, "log", *item)
        for tracker in list(self._trackers):
            self._call(tracker, "close")

    def _call(self, tracker: Tracker, method: str, *args: Any) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as err:  # a tracker's outage must not end a run
            step = f" at step {args[0]}" if args else " ending its run"
            rank_logger("cogvx.train", 0).warning(
                "log.trackers: %s failed%s (%s: %s); it gets nothing more in this run, metrics.jsonl has every step",
                tracker.name, step, type(err).__name__, err)
            self._trackers.remove(tracker)
