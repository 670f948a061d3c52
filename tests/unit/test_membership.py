"""Membership records of elastic runs (train/membership.py) and how `cogvx report` shows them."""

from __future__ import annotations

import json

import pytest

from cogvx_dist.core.config_files import load_config
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.results.report import write_report
from cogvx_dist.train import membership
from cogvx_dist.train.config import RunConfig


def _log_steps(run, steps, world_size):
    with open(RunFolder(run).metrics, "a") as handle:
        for step in steps:
            handle.write(json.dumps({"step": step, "loss": 1.0 / step, "world_size": world_size}) + "\n")


def test_each_launch_records_its_world_size_and_the_steps_it_redoes(tmp_path):
    run = tmp_path / "run"
    first = membership.record_launch(run, 3, 0, membership.last_logged_step(run))
    assert first["previous_world_size"] is None and first["steps_redone"] == 0
    _log_steps(run, range(1, 8), 3)  # a node is lost after step 7; the last commit was step 6
    shrink = membership.record_launch(run, 2, 6, membership.last_logged_step(run))
    assert (shrink["previous_world_size"], shrink["world_size"], shrink["steps_redone"]) == (3, 2, 1)
    _log_steps(run, range(7, 10), 2)  # the node is back: the agents stop the workers, which commit step 9 first
    same = membership.record_launch(run, 2, 9, 9)  # a restart at the same size is no membership change
    grow = membership.record_launch(run, 3, 9, 9)
    assert same["steps_redone"] == 0 and (grow["previous_world_size"], grow["world_size"]) == (2, 3)
    with open(RunFolder(run).membership, "a") as handle:
        handle.write('{"time": 1, "world_si')  # torn by a crash mid-write
    assert [c["world_size"] for c in membership.changes(run)] == [2, 3]
    assert len(membership.read_launches(run)) == 4


def test_the_report_marks_membership_changes(tmp_path):
    run = tmp_path / "run"
    membership.record_launch(run, 3, 0, 0)
    _log_steps(run, range(1, 8), 3)
    membership.record_launch(run, 2, 6, membership.last_logged_step(run))
    _log_steps(run, range(7, 13), 2)
    summary = write_report(run)
    assert [(c["previous_world_size"], c["world_size"], c["steps_redone"]) for c in summary["membership_changes"]] \
        == [(3, 2, 1)]
    assert "3 -> 2 ranks, resumed from step 6, 1 steps redone" in summary["text"]
    assert (RunFolder(run).report / "loss.png").stat().st_size > 0
    plain = tmp_path / "plain"
    membership.record_launch(plain, 2, 0, 0)
    _log_steps(plain, range(1, 4), 2)
    assert "membership" not in write_report(plain)["text"] and "membership_changes" not in write_report(plain)


def test_every_minutes_is_checked():
    base = ["model.path=m", "data.shards=s"]
    assert load_config(RunConfig, None, [*base, "checkpoint.every_minutes=0.5"]).checkpoint.every_minutes == 0.5
    with pytest.raises(CogvxError, match="checkpoint.every_minutes must be 0 .off. or positive, got -1"):
        load_config(RunConfig, None, [*base, "checkpoint.every_minutes=-1"]).validate()


def test_the_restarted_rank_zero_of_an_elastic_job_takes_the_lock_of_its_previous_rank_zero(tmp_path, monkeypatch):
    """torchrun may put rank 0 on another node after a restart, while the lost rank 0's heartbeat is still fresh:
    the same elastic job (TORCHELASTIC_RUN_ID) takes the lock over at once; another job is still refused."""
    import time

    from cogvx_dist.train.run_lock import RunLock, read_lock

    run = tmp_path / "run"
    run.mkdir()
    held = {"host": "node-that-died", "pid": 1, "started": time.time(), "heartbeat": time.time(),
            "elastic_job": "job-7"}
    RunFolder(run).lock.write_text(json.dumps(held))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    with pytest.raises(CogvxError, match="is in use by another training run .pid 1 on node-that-died"):
        RunLock(run).acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    lock = RunLock(run)
    lock.acquire()
    assert read_lock(run)["elastic_job"] == "job-7" and read_lock(run)["host"] != "node-that-died"
    lock.release()
