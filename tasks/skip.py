"""Skip a run when nothing that decides the model changed: its fingerprint equals the
champion's run's, or another run of the same scheduled night claimed the same one.

Trust: the champion's digest is read from its champion record (written only by
conditional writes), the champion run's parts from its manifest, used only when its
digest is the record's. Someone who can write the store can plant a matching digest;
that makes a run skip, which trains and promotes nothing: at worst a night is lost,
never a model replaced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Completed, State

from registry import champions
from run import fingerprint as fingerprints
from run.cache import local_run_dir
from run.context import RunContext
from run.errors import is_io_error
from run.fingerprint import Fingerprint
from run.layout import MANIFEST, SKIPPED, night_key, run_key
from run.nightly import origin
from run.report import render_skipped
from store.base import PreconditionFailed, json_object
from tasks import trend
from tasks.testing import champion_identity

SKIPPED_EVENT = "train-cifar.skipped"


@dataclass(frozen=True)
class Match:
    """What a skipped run matched: the champion's run, or the night's claim by another run."""
    run_id: str
    created_at: str | None
    digest: str
    why: str  # "champion" or "night"


def _champion_parts(store, run_id: str, digest: str | None) -> dict | None:
    """The champion run's fingerprint parts, from its manifest; None if it has none, or
    one whose digest is not the champion record's (the manifest is not the trust anchor)."""
    key = run_key(run_id, MANIFEST)
    raw = store.read_versioned(key)[0]  # at most MAX_DOCUMENT_BYTES
    if raw is None or digest is None:
        return None
    fp = json_object(raw, store.uri_for(key), "expected a run manifest").get("fingerprint")
    if not isinstance(fp, dict) or fp.get("digest") != digest or not isinstance(fp.get("parts"), dict):
        return None
    return fp["parts"] if fingerprints.digest_of(fp["parts"]) == digest else None


@task(name="fingerprint-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=is_io_error)
def fingerprint_run(ctx: RunContext, before_checks: bool = False) -> tuple[Fingerprint, Match | None]:
    """The run's fingerprint, compared with the champion's run's, and what it matched
    (None: train). `force` trains whatever matched. `before_checks`: the data is not
    checked yet; it matches only a champion whose run checked the same data with the same
    thresholds, code, environment and parameters (the check would give its result again),
    and claims no night."""
    fp = fingerprints.take(ctx)
    store = ctx.store
    champion = champions.read(store, champion_identity(ctx))
    match = None
    if champion is not None:
        digest = champion.get("fingerprint")
        parts = _champion_parts(store, champion["run_id"], digest)
        if before_checks:
            fp = fp.with_checks_of(parts)
        fp = fp.compared(champion["run_id"], parts)
        # a retried flow run of the champion itself goes on (it finds its own promotion)
        if digest == fp.digest and champion["run_id"] != ctx.run_id:
            match = Match(champion["run_id"], champion.get("created_at"), digest, "champion")
    if before_checks:
        return fp, None if ctx.params.force else match
    if match is None:
        night = scheduled_night()
        if night is not None and not ctx.params.force:
            match = claim_night(store, *night, fp.digest, ctx.run_id)
    print(f"fingerprint {fp.digest[:12]}"
          + ("" if fp.changed_since_champion is None else
             f"; changed since the champion's run {fp.champion_run_id}: "
             f"{', '.join(fp.changed_since_champion) or 'nothing'}"))
    return fp, None if ctx.params.force else match


def scheduled_night() -> tuple[str, str] | None:
    """(deployment name, YYYY-MM-DD of the scheduled start, UTC) of a run its deployment's
    schedule created; None for any other run."""
    name, night = origin()
    return None if night is None else (name, night)


def claim_night(store, deployment: str, night: str, digest: str, run_id: str) -> Match | None:
    """Claim (deployment, night, digest) for `run_id` by a conditional create; the Match of
    the run that holds it, or None if it is ours (now, or from an earlier try of this run)."""
    key = night_key(deployment, night, digest)
    mine = {"run_id": run_id, "digest": digest, "night": night, "deployment": deployment,
            "claimed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        store.write_if(key, json.dumps(mine, indent=2).encode(), None)
        return None
    except PreconditionFailed:
        pass
    raw = store.read_versioned(key)[0]
    held = json_object(raw or b"{}", store.uri_for(key), "expected a night's claim with run_id")
    holder = held.get("run_id")
    if holder == run_id:
        return None
    if not isinstance(holder, str):
        raise ValueError(f"{store.uri_for(key)}: expected a night's claim with run_id, found {str(held)[:200]}")
    return Match(holder, held.get("claimed_at"), digest, "night")


def skip_run(ctx: RunContext, fp: Fingerprint, match: Match) -> State:
    """Record the skip (store, UI, event) and the flow's final state: Completed, named Skipped."""
    what = ("the champion's run" if match.why == "champion"
            else "the run that claimed this night's fingerprint")
    record = {"run_id": ctx.run_id, "flow_run_id": ctx.flow_run_id, "created_at": ctx.created_at,
              "digest": fp.digest, "matched": {"run_id": match.run_id, "created_at": match.created_at,
                                               "why": match.why}}
    store = ctx.store
    key = run_key(ctx.run_id, SKIPPED)
    store.put_json(key, record, local_run_dir(ctx.run_id))
    message = (f"nothing changed since {what} {match.run_id} ({match.created_at or 'date unknown'}): "
               f"fingerprint {fp.digest[:12]}; trained nothing (force=true trains anyway)")
    print(f"skipped: {message}")
    create_markdown_artifact(render_skipped(record, store.uri_for(key)), key="skipped",
                             description=f"Run {ctx.run_id}: skipped, nothing changed")
    ident = champion_identity(ctx)
    entries = trend.record(store, ident, trend.entry(
        ctx.run_id, "skipped", ctx.created_at, flow_run_id=ctx.flow_run_id, origin=origin(), digest=fp.digest,
        champion=champions.read(store, ident), message=message))
    if entries is not None:
        trend.show(store, ident, entries)
    emit_event(event=SKIPPED_EVENT, resource={"prefect.resource.id": f"train-cifar.run.{ctx.run_id}",
                                              "prefect.resource.name": ctx.run_id},
               payload={**record, "store": store.uri})
    return Completed(name="Skipped", message=message, data={"skipped": store.uri_for(key), **record})
