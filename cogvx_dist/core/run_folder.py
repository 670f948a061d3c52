"""The run folder: every file and folder name a training run writes, for the trainer and for everything that reads
a run (sample --watch, report, demo, launch check).

    RUN/run_config.json          the resolved run config (rank 0, at start)
    RUN/ds_config.json           the resolved DeepSpeed config
    RUN/metrics.jsonl            one JSON object per logged optimizer step
    RUN/tensorboard/             TensorBoard events (validation/ below it for `cogvx sample --watch`)
    RUN/wandb/, RUN/mlflow/      Weights & Biases' offline runs, MLflow's SQLite store (log.trackers; train/trackers.py)
    RUN/trackers.json            those trackers' run ids, for a resume to continue them
    RUN/trace/rank-RRRRR.jsonl   sample keys per step and rank (log.sample_trace)
    RUN/checkpoints/step-SSSSSSSS/   one checkpoint; counts only once COMMITTED.json exists
        COMMITTED.json               the commit marker, written last: step, position, every file's size
        master_weights.safetensors   whole fp32 adapter weights (resume on another world size)
        adam_moments.safetensors     whole fp32 Adam moments and step count (the same)
        lora/                        the adapter in the diffusers format
        lora_ema/                    its moving average (train.ema_decay), in the same format
    RUN/lora/                    the final adapter
    RUN/lora/README.md           its model card (Hugging Face convention: YAML header, then how to load it)
    RUN/lora_ema/                the final moving average of the adapter (train.ema_decay)
    RUN/train_summary.json       written once training finished
    RUN/train.lock               held by the live run (host, pid): a second run refuses the folder
    RUN/failures/rank-RRRRR.json why a rank stopped (cogvx train names the first one)
    RUN/preempted.json           the run stopped on a signal after committing a checkpoint
    RUN/heartbeats/rank-RRRRR.json   each rank's last completed step (the stall watchdog reads them)
    RUN/stacks/rank-RRRRR.txt    Python stacks a stalled job dumped
    RUN/bad_samples.jsonl        samples skipped with data.on_bad_sample: skip
    RUN/membership.jsonl         one line per launch of the run: time, world size, the previous launch's, steps redone
    RUN/validation/              clips of `cogvx sample --watch`, validated.json records what is done
    RUN/report/                  `cogvx report` output
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_CONFIG = "run_config.json"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRACE = "trace"
CHECKPOINTS = "checkpoints"
LORA = "lora"
"""The adapter folder, in a run and in each checkpoint."""
MODEL_CARD = "README.md"
"""The final adapter's model card in RUN/lora/: the name the Hub shows as a repository's page."""
LORA_EMA = "lora_ema"
"""The adapter's moving average (train.ema_decay), beside LORA."""
SUMMARY = "train_summary.json"
VALIDATION = "validation"
VALIDATION_RECORD = "validated.json"
REPORT = "report"
COMMIT_MARKER = "COMMITTED.json"
MASTER_WEIGHTS = "master_weights.safetensors"
ADAM_MOMENTS = "adam_moments.safetensors"
LOCK = "train.lock"
FAILURES = "failures"
PREEMPTED = "preempted.json"
HEARTBEATS = "heartbeats"
STACKS = "stacks"
BAD_SAMPLES = "bad_samples.jsonl"
MEMBERSHIP = "membership.jsonl"
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
RUN_OUTPUTS = (DS_CONFIG, METRICS, TENSORBOARD, TRACE, CHECKPOINTS, LORA, LORA_EMA, SUMMARY, VALIDATION, REPORT,
               PREEMPTED, BAD_SAMPLES, MEMBERSHIP)
"""What a run writes, prunes or truncates beside RUN_CONFIG: in a folder without RUN_CONFIG they are someone else's.
(The lock, failures/, heartbeats/ and stacks/ are left out: a run that died before writing RUN_CONFIG leaves them.)"""


def foreign_outputs(root: str | Path) -> list[str]:
    """The names in `root` a run would overwrite or delete although no run wrote them (no RUN_CONFIG), sorted."""
    root = Path(root)
    if not root.is_dir() or (root / RUN_CONFIG).is_file():
        return []
    return sorted(name for name in RUN_OUTPUTS if (root / name).exists())


def step_folder_name(step: int) -> str:
    """Name of the checkpoint folder of optimizer step `step` (also used for validation clips)."""
    return f"step-{step:08d}"


class RunFolder:
    """Paths inside one run's output_dir."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @property
    def run_config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def ds_config(self) -> Path:
        return self.root / DS_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def trace(self) -> Path:
        return self.root / TRACE

    def trace_file(self, rank: int) -> Path:
        return self.trace / f"rank-{rank:05d}.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint taken after optimizer step `step`."""
        return self.checkpoints / step_folder_name(step)

    @property
    def lora(self) -> Path:
        return self.root / LORA

    @property
    def lora_ema(self) -> Path:
        return self.root / LORA_EMA

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def membership(self) -> Path:
        return self.root / MEMBERSHIP

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION

    @property
    def validation_record(self) -> Path:
        return self.validation / VALIDATION_RECORD

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def failure(self, rank: int) -> Path:
        return self.root / FAILURES / f"rank-{rank:05d}.json"

    @property
    def preempted(self) -> Path:
        return self.root / PREEMPTED

    def heartbeat(self, rank: int) -> Path:
        return self.root / HEARTBEATS / f"rank-{rank:05d}.json"

    def stacks(self, rank: int) -> Path:
        return self.root / STACKS / f"rank-{rank:05d}.txt"

    @property
    def bad_samples(self) -> Path:
        return self.root / BAD_SAMPLES

    def step_folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint folder, committed or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            match = _STEP_FOLDER.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every committed checkpoint, oldest first."""
        return [(step, path) for step, path in self.step_folders() if is_committed(path)]


def is_committed(folder: Path) -> bool:
    """True once a checkpoint folder's commit marker exists."""
    return (Path(folder) / COMMIT_MARKER).is_file()
