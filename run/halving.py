"""Successive halving's stored decisions (runs/<id>/halving/rung-<k>.json), read back for a
retried parent (flows/halving.py), the manifest and the report."""
from __future__ import annotations

from cnn.halving import rungs
from run.context import RunContext
from run.layout import rung_key
from store.base import json_object


def read_decision(raw: bytes, uri: str, rung: int, epoch: int) -> dict:
    d = json_object(raw, uri, "a halving decision")
    if d.get("rung") != rung or d.get("epoch") != epoch or not isinstance(d.get("stops"), list):
        raise ValueError(f"{uri}: expected the decision of rung {rung} at epoch {epoch}, found rung "
                         f"{d.get('rung')!r} at epoch {d.get('epoch')!r}; a run id names one set of parameters")
    return d


def decisions(ctx: RunContext) -> list[dict]:
    """Every rung's stored decision, in order (for the manifest and the report)."""
    out = []
    for k, epoch in enumerate(rungs(ctx.params.halving_min_epochs, ctx.params.halving_factor, ctx.params.epochs), 1):
        key = rung_key(ctx.run_id, k)
        raw, _ = ctx.store.read_versioned(key)
        if raw is None:
            break
        out.append(read_decision(raw, ctx.store.uri_for(key), k, epoch))
    return out
