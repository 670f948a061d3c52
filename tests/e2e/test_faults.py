"""Faults injected into real 2-rank CPU runs (tiny model, ZeRO-2): real signals, real damaged files, a real full
disk, a second real run. Each test asserts how the job ends (exit code, message, time to exit, no process left)
and, where the run can go on, that a resume ends bit-identical to a run that was never interrupted.

The bounds on time to exit are behaviour (a hang is the bug), with margins generous for a loaded 2-core machine.
`COGVX_FAULT_TIMES=file.jsonl` collects the measured times.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogvx_dist.core import shard_format
from cogvx_dist.core.faults import FAULT_ENV
from cogvx_dist.core.run_folder import COMMIT_MARKER, RunFolder
from cogvx_dist.train import checkpoints
from cogvx_dist.train.failures import EXIT_FAILED, EXIT_PREEMPTED, EXIT_STALLED, EXIT_USER_ERROR, read_failures
from tests.helpers import (
    Job,
    assert_same_adapter,
    clean_env,
    damaged_copy,
    free_port,
    launch,
    read_adapter,
    read_trace,
    record_fault_time,
    shard_keys,
    shared_folder,
    summary_of,
    write_config,
)

SLOW = {FAULT_ENV: "train.step_delay_ms=250"}
"""Steps slow enough to signal a rank mid-run."""
SLOW_STEPS_SLOW_KILL = {FAULT_ENV: "train.step_delay_ms=250,train.stall_kill_delay_ms=1000"}
"""And a stall watchdog that is slow to end its rank after killing the stopped one."""
STEPS = 12


@pytest.fixture(scope="module")
def data(synthetic_shards) -> tuple[Path, Path]:
    return synthetic_shards((3, 3, 2))  # 8 samples in 3 shards


def config_for(folder: Path, dataset: tuple[Path, Path], name: str, shards: Path | None = None,
               **sections) -> Path:
    model, default_shards = dataset
    sections.setdefault("train", {}).setdefault("max_steps", STEPS)
    return write_config(folder / f"{name}.yaml", model, shards or default_shards, folder / name, **sections)


def failure_line(job_output: str) -> str:
    lines = [line for line in job_output.splitlines() if line.startswith("cogvx train: ")]
    assert lines, job_output[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """The 12-step 2-rank run that interrupted ones must end identical to (made once per session)."""
    def run(folder: Path) -> None:
        assert launch(config_for(folder, data, "run")).returncode == 0

    return shared_folder(tmp_path_factory, "faults-uninterrupted", run) / "run"


# ------------------------------------------------------------------------------------------------------ preemption
@pytest.mark.parametrize("target", ["group", "launcher", "cogvx-train"])
def test_sigterm_commits_a_checkpoint_and_resume_is_bit_identical(data, uninterrupted, tmp_path, target):
    config = config_for(tmp_path, data, "run")
    job = Job(config, env=SLOW, runner_only=target == "group")
    job.wait_for_step(3)
    if target == "group":  # what Slurm (and a shell's kill -- -PGID) sends: every process of the job at once
        subprocess.run(["kill", "-TERM", "--", f"-{job.process.pid}"], check=True)
    elif target == "launcher":
        job.launcher().send_signal(signal.SIGTERM)
    else:  # Kubernetes signals the container's first process only
        job.process.send_signal(signal.SIGTERM)
    code, seconds = job.end()
    record_fault_time(f"SIGTERM to {target}", seconds)
    preempted = json.loads(RunFolder(job.output).preempted.read_text())
    assert seconds < 20, seconds  # checkpoint.preempt_grace_s is 20
    if target != "group":  # the runner itself dies at once on a group SIGTERM; `cogvx train` reports the outcome
        assert code == EXIT_PREEMPTED, job.output_text()[-3000:]
        assert f"checkpoint of step {preempted['step']} committed" in failure_line(job.output_text())
    steps = [step for step, _ in RunFolder(job.output).complete_checkpoints()]
    assert 3 <= preempted["step"] < STEPS and steps[-1] == preempted["step"]
    assert not RunFolder(job.output).summary.exists()
    if target != "cogvx-train":
        return  # the resume from a preemption's commit is the same whichever process got the signal: once is enough

    resumed = launch(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(job.output)["resumed_from_step"] == preempted["step"]
    assert_same_adapter(job.output, uninterrupted)
    assert read_trace(job.output) == read_trace(uninterrupted)  # no step lost, none twice
    metrics = [json.loads(line)["step"] for line in RunFolder(job.output).metrics.read_text().splitlines()]
    assert metrics == list(range(1, STEPS + 1))  # the resumed run's rows replace nothing twice


def test_a_stopped_rank_ends_the_job_within_the_stall_timeout_naming_it(data, tmp_path):
    config = config_for(tmp_path, data, "run", distributed={"stall_timeout_s": 6})
    job = Job(config, env=SLOW_STEPS_SLOW_KILL)
    job.wait_for_step(3)
    job.rank(1).send_signal(signal.SIGSTOP)
    code, seconds = job.end()
    record_fault_time("SIGSTOP of rank 1", seconds)
    assert code == EXIT_STALLED, job.output_text()[-3000:]
    assert seconds < 6 + 24, seconds  # stall_timeout_s, then the kill and exit on a loaded 2-core machine
    line = failure_line(job.output_text())
    assert "stalled" in line and "rank(s) 1 fell behind" in line, line
    stacks = RunFolder(job.output).stacks(0).read_text()
    assert "cogvx_dist/train/loop.py" in stacks and "Thread" in stacks  # where the main thread waited
    assert "most recent call first" in RunFolder(job.output).stacks(1).read_text()  # woken to dump, then killed


# ------------------------------------------------------------------------------------------------------ bad data
@pytest.mark.parametrize("how, verify", [("header", "size"), ("flipped", "sha256")])
def test_a_bad_sample_fails_naming_shard_key_and_rank(data, tmp_path, how, verify):
    shards, shard, key = damaged_copy(data[1], tmp_path, how)
    config = config_for(tmp_path, data, "run", shards, data={"verify": verify})
    job = Job(config)
    code, _ = job.end()
    record = read_failures(job.output)[0]  # the primary one: the rank that read the sample
    record_fault_time(f"bad sample ({how}), fail", job_end_after(record))
    assert code == EXIT_USER_ERROR, job.output_text()[-3000:]
    line = failure_line(job.output_text())
    assert shard in line and key in line and f"bad sample on rank {record['rank']}" in line, line
    assert job_end_after(record) < 10


def job_end_after(record: dict) -> float:
    """Seconds from a rank's failure record to now (the job has just ended)."""
    return time.time() - record["time"]


def test_a_truncated_shard_is_refused_before_any_rank_starts(data, tmp_path):
    shards, shard, key = damaged_copy(data[1], tmp_path, "truncated")
    config = config_for(tmp_path, data, "run", shards)
    started = time.monotonic()
    result = launch(config)
    record_fault_time("truncated shard, fail (pre-flight)", time.monotonic() - started)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR and len(lines) == 1, result.stderr[-3000:]
    assert shard in lines[0] and "the manifest says" in lines[0] and "on_bad_sample: skip" in lines[0]
    assert f"samples cut off, from {key}" in lines[0]  # the first sample the truncation took


@pytest.mark.parametrize("how", ["header", "truncated", "flipped"])
def test_skip_replaces_bad_samples_counts_them_and_resumes_exactly(data, tmp_path, how):
    shards, shard, key = damaged_copy(data[1], tmp_path, how)
    skip = {"on_bad_sample": "skip", "max_bad_fraction": 0.5, "verify": "sha256" if how == "flipped" else "size"}
    straight = config_for(tmp_path, data, "straight", shards, data=skip)
    assert launch(straight).returncode == 0
    summary = summary_of(tmp_path / "straight")
    assert summary["steps"] == STEPS and summary["bad_samples"] >= 1
    skipped = [json.loads(line) for line in RunFolder(tmp_path / "straight").bad_samples.read_text().splitlines()]
    assert {(s["shard"], s["key"]) for s in skipped} >= {(shard, key)}
    assert key not in {k for *_, k in read_trace(tmp_path / "straight")}  # never trained on
    last = json.loads(RunFolder(tmp_path / "straight").metrics.read_text().splitlines()[-1])
    assert last["bad_samples"] == summary["bad_samples"]
    if how != "header":
        return  # resuming past a skipped sample is the same for every kind of damage: once is enough

    crashed = config_for(tmp_path, data, "crashed", shards, data=skip)
    assert launch(crashed, env={FAULT_ENV: "train.committed=4"}).returncode != 0
    assert launch(crashed).returncode == 0
    assert_same_adapter(tmp_path / "crashed", tmp_path / "straight")
    assert summary_of(tmp_path / "crashed")["bad_samples"] == summary["bad_samples"]
    rows = [json.loads(line) for line in RunFolder(tmp_path / "crashed").bad_samples.read_text().splitlines()]
    assert sorted((r["step"], r["rank"]) for r in rows) == sorted((s["step"], s["rank"]) for s in skipped)


# ------------------------------------------------------------------------------------------------------ bad loss
@pytest.fixture(scope="module")
def overflowing(data, tmp_path_factory) -> tuple[Path, str]:
    """Shards where one sample's latents are finite but so large that the loss overflows."""
    from safetensors.torch import load, save

    folder = tmp_path_factory.mktemp("overflow") / "shards"
    shutil.copytree(data[1], folder)
    manifest = shard_format.Manifest.read(folder)
    entry = manifest.shards[0]
    key = shard_keys(folder)[entry.name][0]
    import webdataset as wds

    samples = list(wds.WebDataset(str(folder / entry.name), shardshuffle=False))
    (folder / entry.name).unlink()
    with wds.TarWriter(str(folder / entry.name)) as sink:
        for sample in samples:
            if sample["__key__"] == key:
                tensors = load(sample[shard_format.TENSORS_EXT])
                tensors[shard_format.LATENT_MEAN] = tensors[shard_format.LATENT_MEAN] * 1e30
                sample = {**sample, shard_format.TENSORS_EXT: save(tensors)}
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    entry.bytes = (folder / entry.name).stat().st_size
    manifest.write(folder)
    return folder, key


SIZES_ONLY = {"verify": "size"}
"""The overflowing sample's digest is not rewritten: these tests are about the loss, not the data check."""


def test_a_nonfinite_loss_fails_naming_the_sample_and_rank(data, overflowing, tmp_path):
    shards, key = overflowing
    job = Job(config_for(tmp_path, data, "run", shards, data=SIZES_ONLY))
    code, _ = job.end()
    assert code == EXIT_USER_ERROR, job.output_text()[-3000:]
    line = failure_line(job.output_text())
    assert "non-finite loss at step" in line and key in line and "rank " in line, line


def test_skip_step_skips_the_update_on_every_rank_and_finishes(data, overflowing, tmp_path):
    shards, key = overflowing
    result = launch(config_for(tmp_path, data, "run", shards, train={"on_nonfinite": "skip_step"}, data=SIZES_ONLY))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path / "run")
    steps_with_it = {step for step, _, _, k in read_trace(tmp_path / "run") if k == key}
    assert summary["steps"] == STEPS and summary["skipped_steps"] == len(steps_with_it) >= 1
    assert len(set(summary["adapter_checksums"])) == 1
    assert all(torch.isfinite(t).all() for t in read_adapter(tmp_path / "run" / "lora").values())
    assert "applied it regardless" not in result.stderr


# ------------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def killed_after_step_8(data, tmp_path_factory) -> Path:
    """The uninterrupted run's configuration on 2 ranks, killed hard right after its step-8 checkpoint committed
    (steps 4 and 8 kept). Tests resume copies of it."""
    def run(folder: Path) -> None:
        assert launch(config_for(folder, data, "run"), env={FAULT_ENV: "train.committed=8"}).returncode != 0
        assert [step for step, _ in RunFolder(folder / "run").complete_checkpoints()] == [4, 8]

    return shared_folder(tmp_path_factory, "faults-killed-after-step-8", run) / "run"


def test_resume_falls_back_from_a_truncated_checkpoint_file(data, uninterrupted, killed_after_step_8, tmp_path):
    """A run killed after its step-8 checkpoint, one file of which is then cut in half: the resume passes over
    step 8, says why, trains on from step 4 and ends bit-identical to the run that was never interrupted."""
    shutil.copytree(killed_after_step_8, tmp_path / "run")
    config = config_for(tmp_path, data, "run")
    run = RunFolder(tmp_path / "run")
    victim = max((p for p in run.checkpoint(8).rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    fallback = launch(config)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "step 8" in fallback.stderr and "passed over" in fallback.stderr and victim.name in fallback.stderr
    assert summary_of(run.root)["resumed_from_step"] == 4
    assert_same_adapter(run.root, uninterrupted)
    assert read_trace(run.root) == read_trace(uninterrupted)


class _Planted:
    """Unpickling this makes a folder: the proof that a loader ran code from the run folder."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.proof),)


def test_a_resume_never_unpickles_what_is_planted_in_the_run_folder(data, uninterrupted, killed_after_step_8,
                                                                    tmp_path):
    """Every pickle-format file of the committed step-8 checkpoint (DeepSpeed's model, optimizer and scheduler
    states) is replaced by a payload that makes a folder when unpickled, and the commit marker is rewritten to match,
    as someone who can write a shared run folder would. `resume: auto` takes step 8, no payload runs, and the run
    ends bit-identical to the uninterrupted one: resume reads only the safetensors copies and JSON."""
    import pickle

    shutil.copytree(killed_after_step_8, tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    folder = run.checkpoint(8)
    proofs = []
    for number, victim in enumerate(sorted(p for p in folder.rglob("*") if p.is_file()
                                           and p.suffix not in (".safetensors", ".json"))):
        proofs.append(tmp_path / f"payload-ran-{number}")
        victim.write_bytes(pickle.dumps(_Planted(proofs[-1])))
    assert len(proofs) >= 2, sorted(p.name for p in folder.rglob("*"))
    marker = checkpoints.read_commit(folder)
    marker["files"] = checkpoints.file_record(folder)
    (folder / COMMIT_MARKER).write_text(json.dumps(marker))
    assert checkpoints.verify(folder) == []

    resumed = launch(config_for(tmp_path, data, "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [proof for proof in proofs if proof.exists()] == []
    assert summary_of(run.root)["resumed_from_step"] == 8
    assert_same_adapter(run.root, uninterrupted)


def test_a_damaged_explicit_resume_checkpoint_is_refused_before_ranks_start(data, uninterrupted, tmp_path):
    """`checkpoint.resume` naming a damaged checkpoint (here a copy of the uninterrupted run's last one, with a file
    cut to 10 bytes) is refused in one line before any rank starts."""
    folder = tmp_path / "checkpoints" / RunFolder(uninterrupted).checkpoint(STEPS).name
    shutil.copytree(RunFolder(uninterrupted).checkpoint(STEPS), folder)
    victim = next(folder.rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:10])
    result = launch(config_for(tmp_path, data, "run"), 2, f"checkpoint.resume={folder}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR and len(lines) == 1, result.stderr[-3000:]
    assert "is damaged" in lines[0] and victim.name in lines[0]
    assert not (tmp_path / "run").exists()  # refused before a rank made the run folder


RESTORE_SCRIPT = """
import sys, torch
from cogvx_dist.core.config_files import load_config
from cogvx_dist.core.process import exit_finished
from cogvx_dist.train import checkpoints, engine
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.guards import RunGuards
from cogvx_dist.train.loop import Trainer
from cogvx_dist.train.preflight import preflight

config = load_config(RunConfig, sys.argv[1], sys.argv[2:])
ranks = engine.init_distributed()
trainer = Trainer(config, preflight(config), ranks, RunGuards(config, ranks).__enter__())  # builds and restores
step = trainer.start_step
restored, optimizer_step = trainer.engine.gather_moments(trainer.parts.lora_names)
saved, saved_step = checkpoints.read_adam_moments(trainer.run.checkpoint(step))
assert optimizer_step == saved_step == step, (optimizer_step, saved_step, step)
assert restored.keys() == saved.keys() and restored
for name, value in saved.items():
    assert torch.equal(restored[name].cpu(), value), name
print("restored", len(saved), "moment tensors of step", step, "exactly")
# As a rank ends (cogvx_dist.train.__main__): skip the interpreter's teardown, in which a live gloo group and the
# watchdog thread could abort the process ("terminate called without an active exception") after the check passed.
exit_finished(0)
"""


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_on_another_rank_count_keeps_the_adam_moments(data, killed_after_step_8, tmp_path, stage):
    if stage == "zero2":  # the module's 2-rank run killed after step 8
        shutil.copytree(killed_after_step_8, tmp_path / "run")
        config, step = config_for(tmp_path, data, "run"), 8
    else:  # 2 ranks, killed after step 4
        config, step = config_for(tmp_path, data, "run", train={"max_steps": 8}, checkpoint={"every_steps": 4},
                                  deepspeed={"config": stage}), 4
        assert launch(config, env={FAULT_ENV: "train.committed=4"}).returncode != 0
    # One rank (twice the accumulation, the same global batch) restores the 2-rank checkpoint: tensor by tensor.
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    check = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(config), "train.grad_accum_steps=4"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and f"of step {step} exactly" in check.stdout, \
        check.stdout[-500:] + check.stderr[-3000:]
    if stage != "zero2":
        # The same 2 ranks go on under another ZeRO stage, dtype and optimizer (CPU Adam), whose DeepSpeed files
        # the checkpoint lacks.
        resumed = launch(config, 2, "deepspeed.config=zero2_offload", "model.dtype=bfloat16")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ("ZeRO stage changed (3 -> 2) and model.dtype changed (float32 -> bfloat16) and optimizer offload "
                "changed (False -> True)" in resumed.stderr and "and Adam moments restored" in resumed.stderr), \
            resumed.stderr[-3000:]
        summary = summary_of(tmp_path / "run")
        assert summary["resumed_from_step"] == step and summary["zero_stage"] == 2
        assert len(set(summary["adapter_checksums"])) == 1  # DeepSpeedCPUAdam updated both ranks alike
        resolved = json.loads((tmp_path / "run" / "ds_config.json").read_text())
        assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        return
    # And the 1-rank run trains on from there.
    resumed = launch(config, 1, "train.grad_accum_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "world size changed (2 -> 1)" in resumed.stderr and "and Adam moments restored" in resumed.stderr
    assert summary_of(tmp_path / "run")["resumed_from_step"] == step


def test_a_resume_under_another_optimizer_starts_its_state_fresh(data, killed_after_step_8, tmp_path):
    """Adam's moments cannot seed Muon (DeepSpeed's load failed with KeyError 'momentum'): on the same 2 ranks the
    weights and position carry over, the new optimizer's state starts fresh."""
    from cogvx_dist.train.ds_config import load_ds_config

    shutil.copytree(killed_after_step_8, tmp_path / "run")
    muon = tmp_path / "muon.json"
    muon.write_text(json.dumps({**load_ds_config("zero2"), "optimizer": {"type": "Muon", "params": {}}}))
    resumed = launch(config_for(tmp_path, data, "run"), 2, f"deepspeed.config={muon}", "train.max_steps=9")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "optimizer changed (adamw -> muon)" in resumed.stderr, resumed.stderr[-3000:]
    assert "the new optimizer's state starts fresh" in resumed.stderr
    assert summary_of(tmp_path / "run")["resumed_from_step"] == 8


# ------------------------------------------------------------------------------------------------------ the disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB tmpfs (root only: skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_names_it_and_keeps_the_previous_checkpoint(data, tmp_path, small_disk):
    config = write_config(tmp_path / "run.yaml", data[0], data[1], small_disk / "run",
                          train={"max_steps": 40}, checkpoint={"every_steps": 4, "keep_last": 5},
                          log={"sample_trace": False, "tensorboard": False})
    job = Job(config, env=SLOW, log=tmp_path / "job.log")  # the job's output must not need the full disk
    run = RunFolder(small_disk / "run")
    deadline = time.monotonic() + 300
    while not run.complete_checkpoints() and time.monotonic() < deadline:
        time.sleep(0.1)
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # leave a few pages for log lines, not enough for a checkpoint
        free = shutil.disk_usage(small_disk).free
        handle.write(b"\0" * max(0, free - 48 * 1024))
    code, seconds = job.end()
    record_fault_time("disk full during a save", seconds)
    assert code == EXIT_USER_ERROR, job.output_text()[-3000:]
    line = failure_line(job.output_text())
    assert "the disk is full" in line and "MiB free on" in line and str(small_disk) in line, line
    good = run.complete_checkpoints()[-1][1]
    filler.unlink()
    assert checkpoints.verify(good) == []
    resumed = launch(config, 2, "train.max_steps=" + str(int(good.name.split("-")[1]) + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_killed_deepspeed_runner_under_a_finished_run_is_no_failure(data, uninterrupted, tmp_path):
    """SIGKILL of DeepSpeed's runner mid-run: its per-node launcher and the ranks go on in the job's process group,
    which `cogvx train` waits for; all steps ran and the adapter is right. Before, `cogvx train` then exited 1,
    "launcher exited with code -9 and no rank recorded why"; now the summary this launch wrote says the run finished,
    and the exit code tells the truth."""
    config = config_for(tmp_path, data, "run")
    job = Job(config, env=SLOW)
    job.wait_for_step(2)
    runner = next(p for p in job.tree if "deepspeed.launcher.runner" in " ".join(p.cmdline()))
    runner.send_signal(signal.SIGKILL)
    code, _ = job.end()
    assert code == 0, job.output_text()[-3000:]
    assert "every rank finished first: the run is complete" in job.output_text()
    assert summary_of(tmp_path / "run")["steps"] == STEPS
    assert_same_adapter(tmp_path / "run", uninterrupted)


# ------------------------------------------------------------------------------------------------------ two runs
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(data, tmp_path):
    config = config_for(tmp_path, data, "run", train={"max_steps": 200})
    first = Job(config, env=SLOW)
    try:
        first.wait_for_step(1)
        second = launch(config)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == EXIT_USER_ERROR and len(lines) == 1, second.stderr[-3000:]
        assert "in use by another training run" in lines[0] and f"pid {first.rank(0).pid}" in lines[0]
    finally:
        first.process.send_signal(signal.SIGTERM)
        first.end()
    assert not RunFolder(tmp_path / "run").lock.exists()  # released on the way out


def test_two_runs_started_together_on_one_output_dir_leave_the_winner_untouched(data, uninterrupted, tmp_path):
    """Both pass `cogvx train`'s check before either holds the lock. Before, the loser's rank 0 wrote its "in use"
    record into the shared failures/ folder, where the winner's rank 1 took it for its peer's: both runs ended with
    exit 1 and a message about a closed connection. Now the loser alone is refused (exit 2, the lock named) without
    touching the folder, and the winner trains to the end, bit-identical to a run that was alone."""
    config = config_for(tmp_path, data, "run")
    jobs = [Job(config, env=SLOW, log=tmp_path / f"job-{number}.log") for number in range(2)]
    codes = sorted((job.end(timeout=600)[0], number) for number, job in enumerate(jobs))
    assert [code for code, _ in codes] == [0, EXIT_USER_ERROR], [job.output_text()[-2000:] for job in jobs]
    loser = jobs[codes[1][1]].output_text()
    assert "in use by another training run" in failure_line(loser), loser[-3000:]
    assert summary_of(tmp_path / "run")["steps"] == STEPS
    assert_same_adapter(tmp_path / "run", uninterrupted)
    assert read_failures(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------------------ lost processes
def wait_for_path(job: Job, path: Path, timeout: float = 300) -> None:
    """Wait until `path` exists (then remember the job's processes)."""
    import psutil

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert job.process.poll() is None, f"job ended early ({job.process.returncode}): {job.output_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s: {job.output_text()[-3000:]}"
        time.sleep(0.05)
    job.tree = psutil.Process(job.process.pid).children(recursive=True)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_during_a_checkpoint_write_is_named(data, tmp_path, victim):
    """SIGKILL of one rank while both write the step-4 checkpoint: the dead rank leaves no record, its peer's
    collective breaks ('Connection closed by peer') and that peer records a lost peer. Before, `cogvx train` blamed
    the survivor ('rank 0 ended the job ... Connection closed by peer' when rank 1 was killed, and the reverse). Now
    the verdict names the rank whose process died without a word, and the last commit (none here) stays intact."""
    config = config_for(tmp_path, data, "run", train={"max_steps": 40})
    job = Job(config, env={FAULT_ENV: "train.step_delay_ms=100,train.save_delay_ms=3000"})
    wait_for_path(job, RunFolder(job.output).checkpoint(4))
    time.sleep(0.5)  # inside the save's delay: DeepSpeed's files written, the gathers and the commit to come
    job.rank(victim).send_signal(signal.SIGKILL)
    code, seconds = job.end()
    record_fault_time(f"SIGKILL of rank {victim} during a checkpoint write", seconds)
    assert code == EXIT_FAILED, job.output_text()[-3000:]
    line = failure_line(job.output_text())
    assert f"rank {victim} " in line and "died" in line and "SIGKILL" in line, line
    assert RunFolder(job.output).complete_checkpoints() == []


def job_processes(marker: str) -> list:
    """Live (not zombie) processes of this host whose command line holds `marker` (a test's config path)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("victim", ["cogvx-train", "launcher"])
def test_a_job_that_loses_its_supervisor_commits_and_stops(data, uninterrupted, tmp_path, victim):
    """SIGKILL of `cogvx train` or of the per-node launcher at step 2 of 12. Before, the ranks trained on to the end
    with nobody to report how the job ended or to end the others on a failure (a killed `cogvx train` exits 137 and
    says nothing). Now every rank sees the loss within a second, the job commits a checkpoint at the next step
    boundary and stops (exit 75, the loss named in preempted.json and by `cogvx train` where it lives), no process of
    the job is left, and (checked once, after the killed `cogvx train`) the resume ends bit-identical to the run
    that was never interrupted."""
    config = config_for(tmp_path, data, "run")
    job = Job(config, env={FAULT_ENV: "train.step_delay_ms=500"})
    job.wait_for_step(2)
    target = job.process if victim == "cogvx-train" else job.launcher()
    lost = f"cogvx train (pid {target.pid} " if victim == "cogvx-train" else f"the per-node launcher (pid {target.pid} "
    target.send_signal(signal.SIGKILL)
    code, seconds = job.end()
    record_fault_time(f"SIGKILL of {victim}", seconds)
    assert seconds < 60, seconds
    assert job_processes(str(config)) == []
    output = job.output_text()
    assert f"{lost}on " in output and "is gone: committing a checkpoint at the next step boundary" in output, \
        output[-3000:]
    preempted = json.loads(RunFolder(job.output).preempted.read_text())
    assert preempted["signal"].startswith(f"the loss of {lost}on "), preempted
    assert not RunFolder(job.output).summary.exists()
    steps = [step for step, _ in RunFolder(job.output).complete_checkpoints()]
    assert 2 < preempted["step"] < STEPS and steps[-1] == preempted["step"], (preempted, steps)
    if victim == "launcher":  # `cogvx train` lives on and reports it
        assert code == EXIT_PREEMPTED, output[-3000:]
        line = failure_line(output)
        assert lost in line and f"checkpoint of step {preempted['step']} committed" in line, line
        return  # the resume from that commit is the same whichever supervisor was lost: once is enough

    resumed = launch(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(job.output)["resumed_from_step"] == preempted["step"]
    assert_same_adapter(job.output, uninterrupted)
    assert read_trace(job.output) == read_trace(uninterrupted)
