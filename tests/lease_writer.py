"""A writer process for tests/test_lease.py: `python -m tests.lease_writer STORE KEY OWNER TTL RELEASE STEP...`.

It claims the lease at KEY as OWNER and, for each STEP (`<epoch>` or `<epoch>:slow`),
publishes a checkpoint and a result record naming OWNER and the epoch. A slow step's
uploads wait until the file RELEASE exists (an upload that outlasts the lease);
no heartbeat renews the lease meanwhile (a writer stalled past its TTL). A writer that
finds the lease held waits for it to expire. Exits 3, printing the error, on LeaseLost.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from store import open_store
from store.lease import Lease, LeaseHeld, LeaseLost


class SlowUploads:
    """`inner`, whose uploads wait for the release file while `slow` is set."""

    def __init__(self, inner, release: Path):
        self.inner, self.release, self.slow = inner, release, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_file(self, key, path):
        if self.slow:
            print(f"uploading {key}", flush=True)
        deadline = time.monotonic() + 120
        while self.slow and not self.release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.inner.put_file(key, path)


def main(uri: str, key: str, owner: str, ttl: float, release: str, *steps: str) -> int:
    store = SlowUploads(open_store(uri), Path(release))
    lease = Lease(store, key, owner, ttl_s=ttl)
    deadline = time.monotonic() + 60
    while True:
        try:
            lease.claim()
            break
        except LeaseHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    print(f"claimed generation {lease.generation}", flush=True)
    work = Path(tempfile.mkdtemp())
    try:
        for step in steps:
            epoch, _, how = step.partition(":")
            (work / "checkpoint.safetensors").write_text(f"{owner} epoch {epoch}")
            (work / "metrics.json").write_text(json.dumps({"name": "flip", "status": "completed",
                                                           "epochs_run": int(epoch), "flow_run_id": owner}))
            store.slow = how == "slow"
            lease.publish({"checkpoint.safetensors": work / "checkpoint.safetensors",
                           "metrics.json": work / "metrics.json"})
            print(f"published epoch {epoch}", flush=True)
    except LeaseLost as e:
        print(f"LeaseLost: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    uri, key, owner, ttl, release, *steps = sys.argv[1:]
    sys.exit(main(uri, key, owner, float(ttl), release, *steps))
