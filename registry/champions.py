"""Champions: one per dataset identity, each with its audit history, changed by CAS only.

A dataset identity is (name, archive MD5, split seed, test size, and the purged hold-out
images if any): runs are compared only when measured on the same test images. Each
identity has one object, `champions/<identity>.json`:

    {"identity": "<name>-<md5>-split<seed>-test<size>[-purged<count>-<hash>]", "champion": <record>,
     "history": [{id, at, action, champion, previous, reason, flow_run_id, by}, ...]}

Champion and history share one object so a change and its entry are one conditional
write: two racing writers cannot both win, and no entry is lost. Whether a candidate
wins is its judge's answer; the registry never compares accuracies itself.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Callable, NamedTuple

from store.base import PreconditionFailed, Store, StoreError, join_key, safe_name

FOLDER = "champions"
LEGACY_KEY = "champion.json"  # the one champion per store of versions before 2026-12-01
# dataset_purged: the purged hold-out's tag (run/records.py purged_tag), absent (None)
# unless purge_test_duplicates dropped images: other test images, another identity
IDENTITY_FIELDS = ("dataset_name", "dataset_md5", "split_seed", "test_size", "dataset_purged")


class Decision(NamedTuple):
    promoted: bool
    reason: str
    compared_with: str | None  # the champion's run id


def identity(record: dict) -> str:
    name, md5, seed, size, purged = (record.get(k) for k in IDENTITY_FIELDS)
    suffix = f"-purged{purged}" if purged else ""
    return safe_name(f"{name}-{md5}-split{seed}-test{size}{suffix}", "dataset identity")


def key_for(ident: str) -> str:
    return join_key(FOLDER, safe_name(ident, "dataset identity") + ".json")


# judge(current champion, candidate) -> (promote?, why)
Judge = Callable[[dict, dict], tuple[bool, str]]


def decide(current: dict | None, candidate: dict, judge: Judge) -> tuple[bool, str]:
    if current is None:
        return True, f"no champion yet for dataset {identity(candidate)}"
    if current["run_id"] == candidate["run_id"]:  # a retried publish finds its own promotion
        return True, f"already the champion of dataset {identity(candidate)}"
    if any(current.get(k) != candidate.get(k) for k in IDENTITY_FIELDS):
        raise ValueError(f"champion {current['run_id']} is of another dataset identity than "
                         f"{identity(candidate)}; refusing to compare")
    return judge(current, candidate)


def _record_problem(rec) -> str | None:
    """What a champion record lacks of the fields this module and cli.predict rely on."""
    if not isinstance(rec, dict):
        return f"a record (a JSON object), found {type(rec).__name__}"
    try:
        safe_name(rec.get("run_id"), "run_id")
    except ValueError:
        return f"'run_id', a run id, found {rec.get('run_id')!r}"
    test = rec.get("test")
    accuracy = test.get("accuracy") if isinstance(test, dict) else None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
        return f"'test' with 'accuracy', a number, found {test!r}"[:300]
    return None


def _check_record(rec, where: str, what: str = "the champion record"):
    problem = _record_problem(rec)
    if problem is not None:
        raise ValueError(f"{where}: {what}: expected {problem}; restore an earlier version of it")
    return rec


def _parse(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where}: expected a champion document (JSON), found unreadable content ({e}); "
                         "restore an earlier version of it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("champion"), dict) or not isinstance(doc.get("history"),
                                                                                                   list):
        found = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{where}: expected a champion document with 'champion' and 'history', found {found}; "
                         "restore an earlier version of it")
    _check_record(doc["champion"], where)
    for i, e in enumerate(doc["history"]):  # every entry is read back: by a retry, by rollback
        if not isinstance(e, dict) or not isinstance(e.get("id"), str):
            raise ValueError(f"{where}: history entry {i}: expected an object with 'id', found {str(e)[:200]}; "
                             "restore an earlier version of it")
        _check_record(e.get("champion"), where, f"history entry {i}'s champion")
        if e.get("previous") is not None:
            _check_record(e["previous"], where, f"history entry {i}'s previous champion")
    return doc


def _legacy(store: Store) -> tuple[str, dict] | None:
    """(identity, record) of a root champion.json, as stores written before champions/
    have it: it stays the champion of its identity until a per-identity object replaces it."""
    raw = store.read_versioned(LEGACY_KEY)[0]
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{store.uri_for(LEGACY_KEY)}: expected a champion record (JSON), found unreadable content "
                         f"({e}); restore an earlier version of it") from None
    _check_record(rec, store.uri_for(LEGACY_KEY))
    if "dataset_name" not in rec:  # the oldest records lack it; their run's manifest has it
        manifest = store.read_json(join_key("runs", safe_name(rec["run_id"], "run_id"), "manifest.json")) or {}
        rec = {**rec, "dataset_name": manifest.get("dataset", {}).get("name", "unknown")}
    return identity(rec), rec


def _load(store: Store, ident: str) -> tuple[dict | None, str | None]:
    """(document, version) of an identity; a matching legacy champion.json counts as one
    with no history (version None: the first write creates the object)."""
    raw, version = store.read_versioned(key_for(ident))
    if raw is not None:
        return _parse(raw, store.uri_for(key_for(ident))), version
    legacy = _legacy(store)
    if legacy is not None and legacy[0] == ident:
        return {"identity": ident, "champion": legacy[1], "history": []}, None
    return None, None


def read(store: Store, ident: str) -> dict | None:
    doc, _ = _load(store, ident)
    return None if doc is None else doc["champion"]


def documents(store: Store) -> dict[str, dict]:
    docs = {}
    for key in store.list(FOLDER):
        name = key.removeprefix(FOLDER + "/")
        if "/" not in name and name.endswith(".json"):
            raw = store.read_versioned(key)[0]
            if raw is not None:  # removed since it was listed
                docs[name.removesuffix(".json")] = _parse(raw, store.uri_for(key))
    legacy = _legacy(store)
    if legacy is not None and legacy[0] not in docs:
        docs[legacy[0]] = {"identity": legacy[0], "champion": legacy[1], "history": []}
    return docs


def _entry(action: str, new: dict, previous: dict | None, reason: str, flow_run_id: str | None,
           by: str | None) -> dict:
    return {"id": uuid.uuid4().hex, "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "action": action, "champion": new, "previous": previous, "reason": reason,
            "flow_run_id": flow_run_id, "by": by}


def _change(store: Store, ident: str, plan, attempts: int = 20):
    """Apply `plan(doc) -> (entry or None, result)` by CAS until it lands or needs nothing;
    the entry's `champion` becomes the champion."""
    key = key_for(ident)
    sent = None  # (entry id, result) of a write of ours that was refused
    for _ in range(attempts):
        doc, version = _load(store, ident)
        history = [] if doc is None else doc["history"]
        if sent is not None and any(e["id"] == sent[0] for e in history):
            # our write did land: its answer was lost and the client's retry of the same
            # conditional PUT got 412 (S3 retries on timeouts and dropped connections)
            return sent[1]
        entry, result = plan(doc)
        if entry is None:
            return result
        new = {"identity": ident, "champion": entry["champion"], "history": [*history, entry]}
        try:
            store.write_if(key, json.dumps(new, indent=2).encode(), version)
            return result
        except PreconditionFailed:
            sent = (entry["id"], result)
            continue
    raise StoreError(f"{store.uri_for(key)} kept changing during {attempts} attempts")


def _already(doc: dict, candidate: dict) -> Decision:
    """The decision that made `candidate` champion, found again: a retried publish
    records the promotion it made, not a comparison of the run with itself."""
    made = next((e for e in reversed(doc["history"]) if e["champion"]["run_id"] == candidate["run_id"]), None)
    if made is None:  # a legacy champion.json names it, or a hand edit: no history says how
        return Decision(True, f"already the champion of dataset {identity(candidate)}", None)
    return Decision(True, made["reason"], None if made["previous"] is None else made["previous"]["run_id"])


def promote(store: Store, candidate: dict, judge: Judge, flow_run_id: str | None = None) -> Decision:
    """Make `candidate` the champion of its identity if `judge` says it wins; each
    concurrent run decides again against the champion it finds."""
    ident = identity(candidate)

    def plan(doc):
        current = None if doc is None else doc["champion"]
        if current is not None and current["run_id"] == candidate["run_id"]:
            return None, _already(doc, candidate)
        ok, reason = decide(current, candidate, judge)
        against = None if current is None else current["run_id"]
        if not ok:
            return None, Decision(False, reason, against)
        return _entry("promote", candidate, current, reason, flow_run_id, None), Decision(True, reason, against)

    return _change(store, ident, plan)


def rollback(store: Store, ident: str, run_id: str, reason: str, by: str | None = None,
             flow_run_id: str | None = None) -> dict:
    """Make `run_id`, an earlier champion of `ident`, its champion again; the entry."""
    def plan(doc):
        if doc is None:
            raise LookupError(f"dataset {ident}: no champion, so nothing to roll back")
        if doc["champion"]["run_id"] == run_id:
            raise ValueError(f"--to {run_id}: already the champion of dataset {ident}")
        earlier = {}
        for e in doc["history"]:
            for rec in (e["previous"], e["champion"]):
                if rec is not None:
                    earlier[rec["run_id"]] = rec
        if run_id not in earlier:
            raise LookupError(f"--to {run_id}: never a champion of dataset {ident}; earlier champions: "
                              f"{', '.join(r for r in earlier if r != doc['champion']['run_id']) or 'none'}")
        entry = _entry("rollback", earlier[run_id], doc["champion"], reason, flow_run_id, by)
        return entry, entry

    return _change(store, ident, plan)
