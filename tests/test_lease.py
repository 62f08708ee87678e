"""The per-unit lease: one writer at a time, claimed by the store's conditional write."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import LocalStore, StoreError, open_store
from store.lease import MAX_BYTES, Lease, LeaseHeld, LeaseLost, committed
from run.layout import Unit, stored_key
from run.records import UnitResult

KEY = "runs/r1/variants/flip/lease.json"


def _eventually(check, seconds: float = 10) -> bool:
    """Whether `check()` comes true within `seconds`, polled: a heartbeat thread or process
    acts on its own schedule, later on a busy machine."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
        # the heartbeat renews every ttl/3
        _eventually(lambda: json.loads((tmp_path / KEY).read_text())["expires_at"] > first)
        assert json.loads((tmp_path / KEY).read_text())["expires_at"] > first
        lease.check()
    assert json.loads((tmp_path / KEY).read_text())["released"] is True
    Lease(store, KEY, owner="B").claim()  # free for the next writer


def test_a_writer_whose_lease_was_taken_stops(tmp_path):
    store = LocalStore(tmp_path)
    with Lease(store, KEY, owner="zombie", ttl_s=0.3) as zombie:
        time.sleep(0.05)
        Lease(store, KEY, owner="replacement", owner_is_gone=lambda o: True).claim()
        _eventually(lambda: zombie.lost is not None)  # the zombie's heartbeat notices
        with pytest.raises(LeaseLost, match="replacement"):
            zombie.check()
    # the zombie's exit did not release the replacement's lease
    assert json.loads((tmp_path / KEY).read_text())["owner"] == "replacement"
    assert json.loads((tmp_path / KEY).read_text())["released"] is False


# ----------------------------------------------------------------------------------------
# fencing: two real writer processes, one stalled in an upload past its lease
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/nightly"


def _writer(uri: str, owner: str, ttl: float, release: Path, *steps: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.lease_writer", uri, KEY, owner, str(ttl), str(release),
                             *steps], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until(proc: subprocess.Popen, prefix: str) -> None:
    """Read `proc`'s lines until one starts with `prefix` (fails, with its output, if it ends first)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return
    pytest.fail(f"the writer ended before {prefix!r}:\n{''.join(seen)}")


def test_a_writer_that_lost_its_lease_changes_nothing_current(store_uri, tmp_path):
    """A commits epoch 1, renews, and starts uploading epoch 3; the upload outlasts its lease.
    B takes the unit over and commits epochs 4 and 5. A's epoch 3 then lands, beside B's
    files, and A's commit is refused: A ends with LeaseLost, B's files are the current ones."""
    release = tmp_path / "release"
    a = _writer(store_uri, "A", 1, release, "1", "3:slow")
    try:
        _until(a, "published epoch 1")
        _until(a, "uploading")  # renewed, then held up in the upload
        b = _writer(store_uri, "B", 1, release, "4", "5")
        out_b, _ = b.communicate(timeout=120)
        assert b.returncode == 0, out_b
        assert "claimed generation 2" in out_b
        release.touch()  # A's stale upload lands now, after B's commit
        out_a, _ = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 3, out_a
    assert "LeaseLost" in out_a and "taken over by flow run B" in out_a

    store, unit = open_store(store_uri), Unit("flip", 0)
    current = stored_key(store, "r1", unit, "checkpoint.safetensors")
    assert store.read_versioned(current)[0] == b"B epoch 5"
    result = UnitResult.read(store, "r1", unit)
    assert (result.flow_run_id, result.epochs_run) == ("B", 5)
    # A's upload is in the store, under its own generation, and never became current
    stale = [k for k in store.list("runs/r1") if store.read_versioned(k)[0] == b"A epoch 3"]
    assert stale and stale[0].startswith("runs/r1/variants/flip/gen-1/") and current.startswith(
        "runs/r1/variants/flip/gen-2/")
    assert committed(store, KEY)["generation"] == 2


# ----------------------------------------------------------------------------------------
# clock skew: expiry goes by the store's clock, not the holder's
_SKEWED_HOLDER = """
import sys, time
real = time.time
time.time = lambda: real() - 3600  # this machine's clock is an hour behind
from store import open_store
from store.lease import Lease
with Lease(open_store(sys.argv[1]), sys.argv[2], "skewed", ttl_s=3) as lease:
    print("held", flush=True)
    sys.stdin.readline()  # until the test is done
"""


def test_a_live_holder_with_a_skewed_clock_keeps_its_lease(store_uri):
    holder = subprocess.Popen([sys.executable, "-c", _SKEWED_HOLDER, store_uri, KEY], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _until(holder, "held")
        store = open_store(store_uri)
        assert json.loads(store.read_versioned(KEY)[0])["expires_at"] < time.time() - 3000  # by its clock, long over
        seen = store.read_versioned(KEY)[0]
        for _ in range(2):  # now, and once it has renewed: it is alive, whatever its clock says
            with pytest.raises(LeaseHeld, match="being trained by flow run skewed"):
                Lease(store, KEY, owner="taker", ttl_s=3).claim()
            # its next renewal (every ttl/3), whenever a busy machine lets it run
            assert _eventually(lambda: store.read_versioned(KEY)[0] != seen, 60), "the holder stopped renewing"
            seen = store.read_versioned(KEY)[0]
        assert json.loads(store.read_versioned(KEY)[0])["owner"] == "skewed"
    finally:
        holder.communicate("\n", timeout=60)
    Lease(open_store(store_uri), KEY, owner="taker").claim()  # released on its exit: free


# ----------------------------------------------------------------------------------------
# a malformed lease record is refused naming it, read bounded
@pytest.mark.parametrize("planted, found", [
    (b"not json {", "found text that is not JSON"),
    (b"[1, 2]", "found a JSON list"),
    (b'{"owner": 5, "writer": "w"}', "found owner = 5"),
    (b'{"owner": "o", "writer": "w", "released": "no"}', "found released = 'no'"),
    (b'{"owner": "o", "writer": "w", "generation": 1, "current": {"generation": 1, "files": '
     b'{"metrics.json": {"key": "runs/other/metrics.json"}}}}', "found current = "),
    (b" " * (MAX_BYTES + 1) + b"{}", f"expected at most {MAX_BYTES:,} bytes, found {MAX_BYTES + 3:,}"),
])
def test_a_malformed_lease_is_refused_naming_it(tmp_path, planted, found):
    store = LocalStore(tmp_path)
    (tmp_path / KEY).parent.mkdir(parents=True)
    (tmp_path / KEY).write_bytes(planted)
    where = re.escape(str(tmp_path / KEY))
    with pytest.raises(StoreError, match=f"^{where}: .*{re.escape(found)}"):
        Lease(store, KEY, owner="B").claim()
    with pytest.raises(StoreError, match=f"^{where}: "):  # and every reader of the unit's files
        UnitResult.read(store, "r1", Unit("flip", 0))
    assert (tmp_path / KEY).read_bytes() == planted  # untouched


# a unit's result record is read from the store too: a planted one is refused naming it
@pytest.mark.parametrize("planted, found", [
    (b"not json {", "found text that is not JSON"),
    (b"[1, 2]", "found a JSON list"),
    (b'{"name": "flip"}', "found status = None"),
    (b'{"name": "flip", "status": "completed", "val_loss": "low"}', "found val_loss = 'low'"),
    (b'{"name": "flip", "status": "completed", "weights_key": 5}', "found weights_key = 5"),
])
@pytest.mark.parametrize("fenced", [False, True])
def test_a_malformed_result_record_is_refused_naming_it(tmp_path, planted, found, fenced):
    store = LocalStore(tmp_path)
    if fenced:  # the record the lease names current
        with Lease(store, KEY, owner="A") as lease:
            (tmp_path / "metrics.json").write_bytes(planted)
            key = lease.publish({"metrics.json": tmp_path / "metrics.json"})["metrics.json"]["key"]
    else:  # a unit written before writes were fenced: its plain key
        key = "runs/r1/variants/flip/metrics.json"
        (tmp_path / key).parent.mkdir(parents=True)
        (tmp_path / key).write_bytes(planted)
    where = re.escape(str(tmp_path / key))
    with pytest.raises(ValueError, match=f"^{where}: expected a result record: .*; {re.escape(found)}"):
        UnitResult.read(store, "r1", Unit("flip", 0))
    assert (tmp_path / key).read_bytes() == planted  # untouched


@pytest.mark.parametrize("expires_at", ["1e300", "1e15", "-1e300"])
def test_a_lease_with_an_absurd_expiry_still_names_its_holder(tmp_path, expires_at):
    """expires_at is for people: a planted one no clock can show still ends in LeaseHeld
    naming the holder (not an OverflowError), and LeaseLost for the writer it displaced."""
    store = LocalStore(tmp_path)
    lease = Lease(store, KEY, owner="A")
    lease.claim()
    (tmp_path / KEY).write_text('{"owner": "planted", "writer": "w", "generation": 9, "ttl_s": 300, '
                                f'"expires_at": {expires_at}}}')
    shown = re.escape(f"lease until {float(expires_at)!r} (not a date)")
    with pytest.raises(LeaseHeld, match=f"being trained by flow run planted .*{shown}"):
        Lease(store, KEY, owner="B").claim()
    with pytest.raises(LeaseLost, match="taken over by flow run planted"):
        lease.renew()


@pytest.mark.parametrize("field", ["ttl_s", "expires_at"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400])
def test_a_lease_with_a_number_that_is_not_finite_is_refused_naming_it(tmp_path, field, value):
    """json reads NaN, Infinity and an int of any length as numbers; a ttl_s of NaN would never
    expire, one of 400 digits would end in an OverflowError naming nothing."""
    store = LocalStore(tmp_path)
    (tmp_path / KEY).parent.mkdir(parents=True)
    (tmp_path / KEY).write_text(f'{{"owner": "o", "writer": "w", "{field}": {value}}}')
    where = re.escape(str(tmp_path / KEY))
    with pytest.raises(StoreError, match=f"^{where}: expected a lease record: .*; found {field} = "):
        Lease(store, KEY, owner="B").claim()
