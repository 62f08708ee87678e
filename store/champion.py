"""The champion: champion.json at the store root names the promoted run and model.

A new model is promoted when there is no champion, or the champion was measured
on the same dataset (MD5), split seed and test size, and the new test accuracy
beats it by at least the margin. The write is conditional (If-None-Match for the
first champion, If-Match on its version after), so two runs racing cannot both
win; the loser re-reads and decides again.
"""
from __future__ import annotations

import json

from store.base import PreconditionFailed, Store, StoreError

KEY = "champion.json"


def decide(current: dict | None, candidate: dict, margin: float) -> tuple[bool, str]:
    """(promote?, why) for `candidate` against the `current` champion."""
    if current is None:
        return True, "no champion yet"
    same = ("dataset_md5", "split_seed", "test_size")
    if any(current.get(k) != candidate.get(k) for k in same):
        theirs = ", ".join(f"{k} {current.get(k)}" for k in same)
        ours = ", ".join(f"{k} {candidate.get(k)}" for k in same)
        return False, f"champion {current['run_id']} was tested on another split ({theirs}; this run: {ours})"
    old, new = current["test"]["accuracy"], candidate["test"]["accuracy"]
    if new > old and new - old >= margin:
        return True, f"test accuracy {new:.4f} beats champion {current['run_id']} ({old:.4f}) by >= {margin}"
    return False, f"test accuracy {new:.4f} does not beat champion {current['run_id']} ({old:.4f}) by more than {margin}"


def read(store: Store) -> dict | None:
    return store.read_json(KEY)


def promote(store: Store, candidate: dict, margin: float, attempts: int = 20) -> tuple[bool, str]:
    """Promote `candidate` if it wins; safe against concurrent runs."""
    won = None  # why we would win, once a write of ours was refused
    for _ in range(attempts):
        raw, version = store.read_versioned(KEY)
        current = None if raw is None else json.loads(raw)
        if won is not None and current == candidate:
            # our write did land: its answer was lost and the client's retry of the same
            # conditional PUT got 412 (S3 retries on timeouts and dropped connections)
            return True, won
        ok, reason = decide(current, candidate, margin)
        if not ok:
            return False, reason
        try:
            store.write_if(KEY, json.dumps(candidate, indent=2).encode(), version)
            return True, reason
        except PreconditionFailed:
            won = reason
            continue  # another run wrote first: read again and decide again
    raise StoreError(f"{store.uri_for(KEY)} kept changing during {attempts} attempts to promote {candidate['run_id']}")
