"""One writer per unit of work: a lease object in the store that fences every write it guards.

The lease names its owner (the flow run), a writer id unique to this claim and a
generation (the fencing token). Another writer takes it over only once it expired by
the store's clock, or its owner is the same flow run (retried) or known to be over.

The lease is also the unit's pointer to its current files. A writer never overwrites
them: it uploads new objects under `gen-<generation>/{a,b}/` (the slot its committed
copy is not in), then makes them current with one conditional write of the lease. A
writer that lost its lease so changes nothing that is current.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from store.base import PreconditionFailed, Store, StoreError, join_key, json_object
from store.outage import Outage

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024  # a lease record is a few hundred bytes


class LeaseHeld(StoreError):
    pass


class LeaseLost(StoreError):
    """Our lease was taken over: this writer must stop writing."""


class BadLease(StoreError):
    pass


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"{t!r} (not a date)"


# `generation`, `ttl_s` and `current` are absent in a record written before writes were fenced
_FIELDS = {"owner": str, "writer": str, "released": bool, "generation": int, "ttl_s": (int, float),
           "expires_at": (int, float), "current": (dict, type(None))}
_REQUIRED = ("owner", "writer")


def _parse(raw: bytes, uri: str, folder: str) -> dict:
    expected = ("expected a lease record: a JSON object with string owner and writer, boolean released, "
                "integer generation, finite numbers ttl_s and expires_at, and current (null, or an object whose "
                f"files name keys under {folder}/gen-<n>/)")
    rec = json_object(raw, uri, expected, BadLease)
    for k, kind in _FIELDS.items():
        if (k in _REQUIRED and k not in rec) or (k in rec and (not isinstance(rec[k], kind) or (
                isinstance(rec[k], bool) and kind is not bool) or (
                kind == (int, float) and not _finite(rec[k])))):
            raise BadLease(f"{uri}: {expected}; found {k} = {rec.get(k)!r:.100}")
    current = rec.get("current")
    if current is not None:
        files = current.get("files")
        ok = isinstance(current.get("generation"), int) and isinstance(files, dict) and all(
            isinstance(f, dict) and isinstance(f.get("key"), str) and _inside(f["key"], folder)
            for f in files.values())
        if not ok or not isinstance(current.get("unit", {}), (dict, type(None))):
            raise BadLease(f"{uri}: {expected}; found current = {json.dumps(current)[:200]}")
    return rec


def _finite(x: int | float) -> bool:
    """json reads NaN, Infinity and integers of any length as numbers."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _inside(key: str, folder: str) -> bool:
    try:
        join_key(key)
    except ValueError:
        return False
    return key.startswith(f"{folder}/gen-")


def read_record(store: Store, key: str) -> tuple[dict | None, str | None, float | None]:
    raw, version, age = store.read_stamped(key, MAX_BYTES)
    if raw is None:
        return None, None, None
    return _parse(raw, store.uri_for(key), key.rpartition("/")[0]), version, age


def committed(store: Store, key: str) -> dict | None:
    """{"generation", "files": {name: {key, uri, sha256, bytes}}, "unit"}; None where no fenced
    writer ever committed (then the unit's files, if any, sit at plain keys)."""
    rec, _, _ = read_record(store, key)
    return None if rec is None else rec.get("current")


class Lease:
    def __init__(self, store: Store, key: str, owner: str, ttl_s: float = 300,
                 owner_is_gone: Callable[[str], bool] | None = None, outage: Outage | None = None):
        self.store, self.key, self.owner, self.ttl_s = store, key, owner, ttl_s
        self.folder = key.rpartition("/")[0]
        # the claim waits out a store outage; renewals fail fast (their callers try again)
        self.outage = outage
        self.owner_is_gone = owner_is_gone or (lambda owner: False)
        self.writer = uuid.uuid4().hex
        self.generation = 0
        self.current: dict | None = None
        self.lost: StoreError | None = None
        self._writing = threading.RLock()  # the heartbeat and the uploads read-modify-write one record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        # expires_at and renewed_at are for people (this machine's clock); takers go by the store's
        return json.dumps({"owner": self.owner, "writer": self.writer, "generation": self.generation,
                           "host": socket.gethostname(), "pid": os.getpid(), "renewed_at": _iso(now),
                           "expires_at": now if released else now + self.ttl_s, "ttl_s": self.ttl_s,
                           "released": released, "current": self.current}).encode()

    def describe(self, cur: dict) -> str:
        return (f"flow run {cur.get('owner')} (on {cur.get('host')}, pid {cur.get('pid')}, "
                f"lease until {_iso(float(cur.get('expires_at', 0)))})")

    def _may_take(self, cur: dict, age: float) -> bool:
        # expiry is the record's age by the store's clock against the holder's own ttl: a
        # holder whose clock is wrong keeps a lease it renews
        return (cur.get("released") or cur.get("owner") == self.owner or age > float(cur.get("ttl_s", self.ttl_s))
                or self.owner_is_gone(str(cur.get("owner"))))

    def claim(self, attempts: int = 10) -> dict | None:
        """Hold the lease with the next generation; returns the previous holder's record, if any."""
        for _ in range(attempts):
            cur, version, age = read_record(self.store, self.key)
            if cur is not None and not self._may_take(cur, age):
                raise LeaseHeld(f"{self.store.uri_for(self.key)}: this unit is being trained by {self.describe(cur)}; "
                                "not training it twice. Wait for it, or cancel that flow run")
            self.generation = (cur or {}).get("generation", 0) + 1
            self.current = (cur or {}).get("current")
            try:
                self.store.write_if(self.key, self._record(), version)
                return cur
            except PreconditionFailed:
                continue
        raise StoreError(f"{self.store.uri_for(self.key)} kept changing during {attempts} attempts to claim it")

    def _mine(self) -> tuple[dict, str]:
        self.check()
        cur, version, _ = read_record(self.store, self.key)
        if cur is None or cur.get("writer") != self.writer:
            self.lost = LeaseLost(f"{self.store.uri_for(self.key)}: taken over by "
                                  f"{self.describe(cur) if cur else 'nobody (the lease is gone)'}; this writer stops")
            raise self.lost
        return cur, version

    def _write(self, current: Callable[[dict], dict | None], released: bool = False) -> None:
        """Rewrite the record this writer holds, its `current` computed from the store's."""
        with self._writing:
            while True:
                cur, version = self._mine()
                self.current = current(cur)
                try:
                    self.store.write_if(self.key, self._record(released), version)
                    return
                except PreconditionFailed:
                    continue

    def renew(self, released: bool = False) -> None:
        self._write(lambda cur: cur.get("current"), released)

    def publish(self, files: dict[str, Path], unit: dict | None = None) -> dict[str, dict]:
        """Upload `files` (name -> local path) and make them current, with `unit` (the facts that
        identify what is trained); returns each name's {key, uri, sha256, bytes}."""
        self.renew()  # LeaseLost before uploading, and the record as the store holds it now
        stored = {}
        for name, path in files.items():
            key = self._next_key(name)
            stored[name] = {"key": key, **self.store.put_file(key, path)}
        self._commit(stored, unit)
        return stored

    def _next_key(self, name: str) -> str:
        a, b = (join_key(self.folder, f"gen-{self.generation}", slot, name) for slot in ("a", "b"))
        now = ((self.current or {}).get("files") or {}).get(name, {}).get("key")
        return b if now == a else a

    def _commit(self, stored: dict[str, dict], unit: dict | None) -> None:
        def current(cur: dict) -> dict:
            before = cur.get("current") or {}
            return {"generation": self.generation, "files": {**before.get("files", {}), **stored},
                    "unit": unit if unit is not None else before.get("unit")}

        self._write(current)

    def check(self) -> None:
        """LeaseLost once the background renewal found the lease taken over."""
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
