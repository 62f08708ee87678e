"""One writer per unit of work: a lease object in the store, claimed by conditional write.

The lease names its owner (the flow run that trains the unit) and a writer id unique
to this claim, and expires unless renewed. A second writer takes over a lease that
expired, that its own flow run held (a retried or rescheduled flow run is the same
owner), or whose owner is known to be over (`owner_is_gone`, e.g. the flow run is
Crashed); otherwise it stops with `LeaseHeld`, naming the owner. A writer whose lease
was taken over learns it at its next renewal (`LeaseLost`) and stops writing.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from store.base import PreconditionFailed, Store, StoreError
from store.outage import Outage

log = logging.getLogger(__name__)


class LeaseHeld(StoreError):
    """Another live writer holds the lease."""


class LeaseLost(StoreError):
    """Our lease was taken over: this writer must stop writing."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class Lease:
    def __init__(self, store: Store, key: str, owner: str, ttl_s: float = 300,
                 owner_is_gone: Callable[[str], bool] | None = None, outage: Outage | None = None):
        self.store, self.key, self.owner, self.ttl_s = store, key, owner, ttl_s
        # the claim waits out a store outage; renewals fail fast (their callers try again)
        self.outage = outage
        self.owner_is_gone = owner_is_gone or (lambda owner: False)
        self.writer = uuid.uuid4().hex  # this claim; a re-execution of the same owner gets a new one
        self.lost: StoreError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "writer": self.writer, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": _iso(now),
                           "expires_at": now if released else now + self.ttl_s, "released": released}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        raw, version = self.store.read_versioned(self.key)
        return (None if raw is None else json.loads(raw)), version

    def describe(self, cur: dict) -> str:
        return (f"flow run {cur.get('owner')} (on {cur.get('host')}, pid {cur.get('pid')}, "
                f"lease until {_iso(float(cur.get('expires_at', 0)))})")

    def _may_take(self, cur: dict) -> bool:
        return (cur.get("released") or cur.get("owner") == self.owner or float(cur.get("expires_at", 0)) < time.time()
                or self.owner_is_gone(str(cur.get("owner"))))

    def claim(self, attempts: int = 10) -> dict | None:
        """Hold the lease, or raise LeaseHeld naming its holder; returns the previous holder's
        record (None if there was none)."""
        for _ in range(attempts):
            cur, version = self._read()
            if cur is not None and not self._may_take(cur):
                raise LeaseHeld(f"{self.store.uri_for(self.key)}: this unit is being trained by {self.describe(cur)}; "
                                "not training it twice. Wait for it, or cancel that flow run")
            try:
                self.store.write_if(self.key, self._record(), version)
                return cur
            except PreconditionFailed:
                continue  # another writer moved first: look again
        raise StoreError(f"{self.store.uri_for(self.key)} kept changing during {attempts} attempts to claim it")

    def renew(self, released: bool = False) -> None:
        """Extend the lease (or give it up); LeaseLost if another writer holds it now."""
        if self.lost is not None:
            raise self.lost
        cur, version = self._read()
        if cur is None or cur.get("writer") != self.writer:
            self.lost = LeaseLost(f"{self.store.uri_for(self.key)}: taken over by "
                                  f"{self.describe(cur) if cur else 'nobody (the lease is gone)'}; this writer stops")
            raise self.lost
        try:
            self.store.write_if(self.key, self._record(released), version)
        except PreconditionFailed:
            return self.renew(released)  # changed between read and write: read again

    def check(self) -> None:
        """Raise LeaseLost if the background renewal found the lease taken over."""
        if self.lost is not None:
            raise self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("renewing %s failed (%s); trying again in %.0fs", self.key, e, self.ttl_s / 3)

    def __enter__(self) -> Lease:
        if self.outage is not None:
            self.outage.call(self.claim)
        else:
            self.claim()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            try:
                self.renew(released=True)
            except Exception as e:  # noqa: BLE001 - it expires by itself anyway
                log.warning("releasing %s failed: %s", self.key, e)
