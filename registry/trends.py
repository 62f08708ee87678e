"""Night over night: one trend per dataset identity, `trends/<identity>.jsonl`.

Every run that knows its dataset identity adds one entry: trained (from publish), skipped
(nothing changed), failed (after the dataset was fetched). A night superseded by a newer
one (late_runs=latest) ends before it opens its data, so it does not know its identity:
it leaves its entry in `trends/superseded/<deployment>/<run id>.json`, and the next entry
added by a run of the same deployment folds it into that run's trend.

The object is JSON lines, oldest first: an optional first line `{"summary": {...}}` (the
entries dropped for age, counted), then one entry per run id. A run that adds again (a
retried publish, a failed run retried until it trains) replaces its own entry. Each
change is one conditional write of the whole object, so concurrent runs lose nothing.

Entries older than RETENTION_DAYS, and beyond the newest MAX_ENTRIES, are dropped and
counted in the summary (per status, promotions, regressions, first and last date, best
test accuracy), so the object stays under ~1 MB.

Trust: the trend is a record for people, never an input to a decision. Promotion and
the regression alert come from the paired comparison on the test images; someone who can
write the store can rewrite this history (what the picture and the table show), not
make a model champion or hide tonight's alert.
"""
from __future__ import annotations

import json
import math
import random
import time
from datetime import datetime, timedelta, timezone

from store.base import PreconditionFailed, Store, StoreError, join_key, json_object, name_part, safe_name

FOLDER = "trends"
PENDING = "superseded"  # trends/superseded/<deployment>/<run id>.json
RETENTION_DAYS = 400
MAX_ENTRIES = 1000
STATUSES = ("trained", "skipped", "superseded", "failed")
# what every entry has, and its type: a planted or damaged line is refused naming it
_REQUIRED = {"run_id": str, "at": str, "status": str}


def key_for(ident: str) -> str:
    return join_key(FOLDER, safe_name(ident, "dataset identity") + ".jsonl")


def pending_key(deployment: str, run_id: str) -> str:
    return join_key(FOLDER, PENDING, name_part(deployment), safe_name(run_id, "run_id") + ".json")


def check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a trend entry (a JSON object), found {type(entry).__name__}")
    for name, kind in _REQUIRED.items():
        if not isinstance(entry.get(name), kind):
            raise ValueError(f"{where}: expected '{name}' ({kind.__name__}) in a trend entry, "
                             f"found {entry.get(name)!r}; restore an earlier version of it")
    if entry["status"] not in STATUSES:
        raise ValueError(f"{where}: expected 'status' one of {', '.join(STATUSES)}, found {entry['status']!r}")
    _when(entry, where)
    test = entry.get("test")
    if test is not None and not (isinstance(test, dict) and _number(test.get("accuracy"))):
        raise ValueError(f"{where}: expected 'test' with 'accuracy', a number, found {str(test)[:200]}")
    return entry


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _when(entry: dict, where: str = "trend entry") -> datetime:
    try:
        at = datetime.fromisoformat(entry["at"])
    except ValueError:
        raise ValueError(f"{where}: expected 'at', an ISO date and time, found {entry['at']!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def parse(raw: bytes, where: str) -> tuple[dict | None, list[dict]]:
    """(summary or None, entries oldest first)."""
    summary, entries = None, []
    try:
        lines = raw.decode().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: expected JSON lines, found bytes that are not UTF-8 ({e}); "
                         "restore an earlier version of it") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = json_object(line.encode(), f"{where} line {n}", "expected a trend entry")
        if n == 1 and set(obj) == {"summary"}:
            if not isinstance(obj["summary"], dict):
                raise ValueError(f"{where} line 1: expected a summary object, found {obj['summary']!r}")
            summary = obj["summary"]
        else:
            entries.append(check_entry(obj, f"{where} line {n}"))
    return summary, entries


def dump(summary: dict | None, entries: list[dict]) -> bytes:
    lines = ([json.dumps({"summary": summary}, sort_keys=True)] if summary else []) + [
        json.dumps(e, sort_keys=True) for e in entries]
    return ("\n".join(lines) + "\n").encode()


def read(store: Store, ident: str) -> tuple[dict | None, list[dict]]:
    raw, _ = store.read_versioned(key_for(ident))
    return (None, []) if raw is None else parse(raw, store.uri_for(key_for(ident)))


def identities(store: Store) -> list[str]:
    prefix = FOLDER + "/"
    return sorted(k.removeprefix(prefix).removesuffix(".jsonl") for k in store.list(FOLDER)
                  if k.endswith(".jsonl") and "/" not in k.removeprefix(prefix))


def summarise(summary: dict | None, dropped: list[dict]) -> dict | None:
    """The summary with `dropped` counted in."""
    if not dropped:
        return summary
    s = dict(summary or {"entries": 0, "by_status": {}, "promoted": 0, "regressions": 0, "first": None,
                         "last": None, "best_test_accuracy": None})
    by_status = dict(s.get("by_status") or {})
    for e in dropped:
        by_status[e["status"]] = by_status.get(e["status"], 0) + 1
        accuracy = (e.get("test") or {}).get("accuracy")
        if _number(accuracy) and (s["best_test_accuracy"] is None or accuracy > s["best_test_accuracy"]):
            s["best_test_accuracy"] = accuracy
    ats = [e["at"] for e in dropped] + [x for x in (s.get("first"), s.get("last")) if x]
    s.update(entries=s.get("entries", 0) + len(dropped), by_status=by_status,
             promoted=s.get("promoted", 0) + sum(bool(e.get("promoted")) for e in dropped),
             regressions=s.get("regressions", 0) + sum(bool(e.get("regression")) for e in dropped),
             first=min(ats), last=max(ats))
    return s


def _kept(summary: dict | None, entries: list[dict], now: datetime) -> tuple[dict | None, list[dict]]:
    entries = sorted(entries, key=lambda e: (_when(e), e["run_id"]))
    cutoff = now - timedelta(days=RETENTION_DAYS)
    old = [e for e in entries if _when(e) < cutoff]
    young = [e for e in entries if _when(e) >= cutoff]
    over = young[:-MAX_ENTRIES] if len(young) > MAX_ENTRIES else []
    return summarise(summary, old + over), young[len(over):]


def _pending(store: Store, deployment: str | None, known: set[str], now: datetime) -> list[dict]:
    """Superseded nights of `deployment` waiting for a trend, not in it yet and not too old."""
    if not deployment:
        return []
    folder = join_key(FOLDER, PENDING, name_part(deployment))
    out = []
    for key in store.list(folder):
        if key.rsplit("/", 1)[-1].removesuffix(".json") in known:
            continue  # taken in already: its name is its run id, so it is not read again
        try:
            raw = store.read_versioned(key)[0]  # a huge planted one is refused (TooLarge, a ValueError)
            if raw is None:
                continue
            entry = check_entry(json_object(raw, store.uri_for(key), "expected a trend entry"), store.uri_for(key))
        except ValueError as e:  # one damaged or planted file costs its own night, not the trend
            print(f"left out of the trend: {e}")
            continue
        if entry["run_id"] not in known and _when(entry) >= now - timedelta(days=RETENTION_DAYS):
            out.append(entry)
    return out


def add(store: Store, ident: str, entry: dict, attempts: int = 20,
        now: datetime | None = None) -> tuple[dict | None, list[dict]]:
    """Add (or replace, by run id) `entry` in the trend of `ident`, with the superseded
    nights of its deployment that wait; the trend as written (summary, entries)."""
    check_entry(entry, "trend entry")
    key = key_for(ident)
    for attempt in range(attempts):
        raw, version = store.read_versioned(key)
        summary, entries = (None, []) if raw is None else parse(raw, store.uri_for(key))
        clock = now or datetime.now(timezone.utc)
        others = [e for e in entries if e["run_id"] != entry["run_id"]]
        waiting = _pending(store, entry.get("deployment"), {e["run_id"] for e in others} | {entry["run_id"]}, clock)
        summary, kept = _kept(summary, [*others, *waiting, entry], clock)
        try:
            store.write_if(key, dump(summary, kept), version)
            return summary, kept
        except PreconditionFailed:  # another run added first: read again, after a pause that spreads the racers
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
    raise StoreError(f"{store.uri_for(key)} kept changing during {attempts} attempts")


def leave_superseded(store: Store, deployment: str, entry: dict) -> str:
    """Store a superseded night's entry until a run of `deployment` adds to a trend."""
    check_entry(entry, "trend entry")
    key = pending_key(deployment, entry["run_id"])
    try:
        store.write_if(key, json.dumps(entry, sort_keys=True).encode(), None)
    except PreconditionFailed:
        pass  # a retry of the same night: its entry is there
    return store.uri_for(key)
