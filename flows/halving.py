"""Successive halving over a run's units (halving=on): train every unit to the first rung,
stop the variants behind (cnn/halving.py), train the others to the next rung from their
checkpoints, and so on; the last survivors train to the end.

Each rung's decision is written to the store once (runs/<id>/halving/rung-<k>.json,
created only if absent), so a parent that crashed and is retried reads the decisions it
made instead of making them again; the scores it would decide on are the units' stored
records anyway. A pruned unit keeps its checkpoint and has no final record: a later run
of the same run id with halving off resumes it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

from cnn.halving import MissingScores, decide, rungs
from cnn.stats import paired_difference
from run.context import RunContext
from run.layout import Unit, rung_key
from run.records import UnitResult
from store import PreconditionFailed
from run.halving import read_decision

# (units, until epoch or None for the end, rung or None) -> their results, in order
Dispatch = Callable[[list[Unit], "int | None", "int | None"], list[UnitResult]]


def halve(ctx: RunContext, units: list[Unit], dispatch: Dispatch,
          on_change: Callable[[str, dict], None] = lambda label, row: None) -> list[UnitResult]:
    p = ctx.params
    results: dict[Unit, UnitResult] = {}
    live = list(units)
    for k, epoch in enumerate(rungs(p.halving_min_epochs, p.halving_factor, p.epochs), 1):
        if not live:
            break
        got = dict(zip(live, dispatch(live, epoch, k)))
        paused = [u for u in live if got[u].status == "paused"]
        results.update({u: got[u] for u in live if u not in paused})  # ended before the rung, or failed
        if not paused:
            live = []
            break
        decision = rung_decision(ctx, k, epoch, units, {**results, **got})
        stops = {s["variant"]: s for s in decision["stops"]}
        for u in paused:
            if u.variant in stops:
                results[u] = dataclasses.replace(got[u], status="pruned", pruned=stops[u.variant])
                on_change(u.label, results[u].summary())
                if p.variant_deployment and got[u].flow_run_id:
                    from flows.fanout import mark_pruned

                    mark_pruned(got[u].flow_run_id, stops[u.variant]["sentence"])
        live = [u for u in paused if u.variant not in stops]
    if live:
        results.update(zip(live, dispatch(live, None, None)))
    return [results[u] for u in units]


def rung_decision(ctx: RunContext, rung: int, epoch: int, units: list[Unit], results: dict[Unit, UnitResult]) -> dict:
    """The stored decision at `rung`, or the one made now from `results` and stored."""
    store, key = ctx.store, rung_key(ctx.run_id, rung)
    raw, _ = store.read_versioned(key)
    if raw is not None:
        return read_decision(raw, store.uri_for(key), rung, epoch)
    by_variant: dict[str, list[UnitResult]] = {}
    for u in units:
        if u in results:
            by_variant.setdefault(u.variant, []).append(results[u])
    running = [v for v, rs in by_variant.items() if any(r.status == "paused" for r in rs)]
    scored = {v: [r for r in by_variant[v] if r.val_accuracy is not None] for v in running}
    scores = {v: (sum(r.val_accuracy for r in rs) / len(rs) if rs else None) for v, rs in scored.items()}
    labels = None

    def paired(a: str, b: str):
        nonlocal labels
        from tasks.scoring import outcomes, val_labels

        labels = val_labels(ctx) if labels is None else labels
        return paired_difference(outcomes(store, scored[a], labels), outcomes(store, scored[b], labels))

    try:
        kept, stops = decide(rung, epoch, scores, ctx.params.halving_factor, paired)
    except MissingScores as e:  # a running variant whose repeats all have no score: nothing stops
        print(f"halving: {e}")
        kept, stops = list(scores), []
    decision = {"rung": rung, "epoch": epoch, "scores": scores, "kept": kept,
                "units": {u.label: results[u].val_accuracy for u in units if u in results and u.variant in scores},
                "stops": [s.to_dict() for s in stops]}
    for s in stops:
        print(f"halving: {s.sentence}")
    print(f"halving: rung {rung} (epoch {epoch}): {', '.join(kept)} go on")
    try:
        store.write_if(key, json.dumps(decision, indent=2).encode(), None)
    except PreconditionFailed:  # another execution of this run decided first: its decision stands
        return read_decision(store.read_versioned(key)[0], store.uri_for(key), rung, epoch)
    return decision
