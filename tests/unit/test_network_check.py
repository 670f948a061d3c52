"""The watchdog's network check, in parts that need no second host: what counts as an answer, which intervals set
the bound, what a heartbeat records, and the config's refusals. tests/e2e/test_network_faults.py cuts a real link
between two network-namespace hosts."""

from __future__ import annotations

import json
import socket
import time

import pytest

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.watchdog import Watchdog, network_stall_bound, unreachable


def test_a_listening_port_and_a_refusing_one_both_answer():
    """A refused connection means the host is up and the link works: only silence or no route count against it."""
    with socket.create_server(("127.0.0.1", 0)) as listening, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: the kernel refuses connections to it
        targets = [("127.0.0.1", listening.getsockname()[1]), ("127.0.0.1", closed.getsockname()[1])]
        assert unreachable(targets, timeout_s=5) == {}


def test_the_bound_is_the_floor_until_steps_are_slower_than_a_tenth_of_it():
    assert network_stall_bound(180, 10, 0.0) == 180
    assert network_stall_bound(180, 10, 12.5) == 180
    assert network_stall_bound(180, 10, 30.0) == 300


def test_the_launchs_first_step_is_not_measured_but_later_steps_and_saves_are(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    dog = Watchdog(tmp_path, 0, 1, stall_timeout_s=0, on_stall=lambda *_: None, on_peer_failure=lambda _: None,
                   network_floor_s=1.0, network_factor=10.0).start()
    try:
        dog.progress(0)  # built: start-up is not a step
        time.sleep(0.3)
        dog.progress(5)  # a resumed launch's first step (restore, loader start): not measured either
        assert dog.slowest_step_s == 0 and dog.network_bound_s() == 1.0
        time.sleep(0.15)
        dog.progress(6)
        assert dog.slowest_step_s >= 0.15
        time.sleep(0.25)
        dog.progress(6)  # the checkpoint of step 6
        assert dog.slowest_step_s >= 0.25 and dog.network_bound_s() == max(1.0, 10 * dog.slowest_step_s)
        beat = json.loads(RunFolder(tmp_path).heartbeat(0).read_text())
        assert beat["address"] == "127.0.0.1"  # the route to MASTER_ADDR
        assert unreachable([(beat["address"], beat["probe_port"])]) == {}
    finally:
        dog.stop()


def test_no_address_is_recorded_with_the_check_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dog = Watchdog(tmp_path, 0, 1, stall_timeout_s=0, on_stall=lambda *_: None,
                   on_peer_failure=lambda _: None).start()
    dog.stop()
    assert "probe_port" not in json.loads(RunFolder(tmp_path).heartbeat(0).read_text())


@pytest.mark.parametrize("key, value", [("network_stall_floor_s", -1.0), ("network_stall_factor", -2.0)])
def test_negative_network_bounds_are_refused_naming_the_key(key, value):
    config = RunConfig()
    setattr(config.distributed, key, value)
    with pytest.raises(CogvxError, match=f"distributed.{key}"):
        config.validate_settings()
