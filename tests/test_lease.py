"""The per-unit lease: one writer at a time, claimed by the store's conditional write."""
from __future__ import annotations

import json
import time

import pytest

from store import LocalStore
from store.lease import Lease, LeaseHeld, LeaseLost

KEY = "runs/r1/variants/flip/lease.json"


def test_a_second_writer_is_refused_naming_the_owner(tmp_path):
    store = LocalStore(tmp_path)
    first = Lease(store, KEY, owner="flow-run-A")
    assert first.claim() is None
    with pytest.raises(LeaseHeld, match="being trained by flow run flow-run-A .*lease until"):
        Lease(store, KEY, owner="flow-run-B").claim()
    assert json.loads((tmp_path / KEY).read_text())["owner"] == "flow-run-A"  # untouched


def test_the_same_flow_run_takes_its_lease_back(tmp_path):
    """A retried or rescheduled flow run is the same owner: it continues."""
    store = LocalStore(tmp_path)
    old = Lease(store, KEY, owner="flow-run-A")
    old.claim()
    again = Lease(store, KEY, owner="flow-run-A")
    assert again.claim()["writer"] == old.writer
    # the old execution, should it still be alive, finds out at its next renewal
    with pytest.raises(LeaseLost, match="taken over by flow run flow-run-A"):
        old.renew()
    again.renew()


def test_an_expired_or_abandoned_lease_is_taken_over(tmp_path):
    store = LocalStore(tmp_path)
    Lease(store, KEY, owner="crashed-run", ttl_s=0.2).claim()
    with pytest.raises(LeaseHeld):
        Lease(store, KEY, owner="new-run").claim()
    time.sleep(0.3)
    assert Lease(store, KEY, owner="new-run").claim()["owner"] == "crashed-run"  # expired

    # not expired, but its owner is known to be over (Prefect says Crashed)
    other = "runs/r1/variants/none/lease.json"
    Lease(store, other, owner="live-run", ttl_s=600).claim()
    with pytest.raises(LeaseHeld):
        Lease(store, other, owner="replacement", owner_is_gone=lambda owner: False).claim()
    gone = Lease(store, other, owner="replacement", owner_is_gone=lambda owner: owner == "live-run")
    assert gone.claim()["owner"] == "live-run"


def test_released_on_exit_and_renewed_while_held(tmp_path):
    store = LocalStore(tmp_path)
    with Lease(store, KEY, owner="A", ttl_s=0.6) as lease:
        first = json.loads((tmp_path / KEY).read_text())["expires_at"]
        time.sleep(0.5)  # the heartbeat renews every ttl/3
        assert json.loads((tmp_path / KEY).read_text())["expires_at"] > first
        lease.check()
    assert json.loads((tmp_path / KEY).read_text())["released"] is True
    Lease(store, KEY, owner="B").claim()  # free for the next writer


def test_a_writer_whose_lease_was_taken_stops(tmp_path):
    store = LocalStore(tmp_path)
    with Lease(store, KEY, owner="zombie", ttl_s=0.3) as zombie:
        time.sleep(0.05)
        Lease(store, KEY, owner="replacement", owner_is_gone=lambda o: True).claim()
        time.sleep(0.3)  # the zombie's heartbeat notices
        with pytest.raises(LeaseLost, match="replacement"):
            zombie.check()
    # the zombie's exit did not release the replacement's lease
    assert json.loads((tmp_path / KEY).read_text())["owner"] == "replacement"
    assert json.loads((tmp_path / KEY).read_text())["released"] is False
