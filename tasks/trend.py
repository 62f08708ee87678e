"""Night over night (registry/trends.py): each run's trend entry, the regression alert,
and the trend in the Prefect UI.

A regression: tonight's model is worse than the champion beyond noise, the paired
interval's upper bound on the same test images below -regression_margin. It is not
promoted (the promotion rule already says no); it is said in one sentence in the
manifest and the report, and emitted as `train-cifar.regression` with the numbers and
what changed since the champion's run (the fingerprint's parts), for an automation
(deployments/notify-on-regression.yaml) to tell someone.
"""
from __future__ import annotations

import json
import re
import uuid

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from cnn.stats import accuracy_interval
from registry import trends
from run.nightly import origin

REGRESSION_EVENT = "train-cifar.regression"


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:12] + "..."


def changes(changed_since_champion: dict | None) -> list[str]:
    """'params.lr 0.05 -> 0.0005', 'environment.torch 2.14.1 -> 2.15.0', 'code' (a digest)."""
    out = []
    for part, both in (changed_since_champion or {}).items():
        before, now = both.get("champion"), both.get("now")
        if isinstance(before, dict) and isinstance(now, dict):
            out += [f"{part}.{k} {_short(before.get(k))} -> {_short(now.get(k))}" for k in now]
        elif part == "code":
            out.append("code")
        else:
            out.append(f"{part} {_short(before)} -> {_short(now)}")
    return out


def regression(comparison: dict | None, margin: float, changed: dict | None, confidence: float) -> dict | None:
    """The regression record when the model is worse than the champion beyond noise
    (the interval's upper bound below -margin), else None. `comparison` is the manifest's
    test.champion_comparison."""
    if not comparison or comparison.get("ci") is None or comparison.get("difference") is None:
        return None  # not compared, or the champion could not be faced: nothing to say it is worse
    low, high = comparison["ci"]
    if not high < -margin:
        return None
    named = changes(changed)
    interval = (f"{confidence:.0%} interval {low * 100:+.2f} to {high * 100:+.2f}" if confidence
                else "no interval: promote_confidence 0 compares point estimates")
    what = ("; changed since the champion's run: " + ", ".join(named) if named else
            "; nothing in the fingerprint changed since the champion's run" if changed is not None else "")
    sentence = (f"the new model is worse than champion {comparison['champion_run_id']} by "
                f"{-comparison['difference'] * 100:.2f} points ({interval}) on the same test images, beyond the "
                f"regression margin of {margin * 100:.2f} points{what}")
    return {"champion_run_id": comparison["champion_run_id"], "difference": comparison["difference"],
            "ci": [low, high], "margin": margin, "changed": named, "sentence": sentence}


def emit_regression(manifest: dict, store_uri: str) -> None:
    """Once per run: the event's id comes from the run id, so a retried publish's second
    emission is the same event (the server keeps one)."""
    r, t = manifest["regression"], manifest["test"]
    emit_event(event=REGRESSION_EVENT,
               resource={"prefect.resource.id": f"train-cifar.run.{manifest['run_id']}",
                         "prefect.resource.name": manifest["run_id"]},
               id=uuid.uuid5(uuid.NAMESPACE_URL, f"train-cifar.regression/{manifest['run_id']}"),
               payload={**r, "run_id": manifest["run_id"], "test_accuracy": t["accuracy"],
                        "dataset_identity": manifest["dataset"]["identity"],
                        "changed_since_champion": manifest.get("changed_since_champion"),
                        "manifest": f"{store_uri.rstrip('/')}/runs/{manifest['run_id']}/manifest.json"})


def entry(run_id: str, status: str, at: str, *, flow_run_id: str | None = None,
          origin: tuple[str | None, str | None] = (None, None),
          digest: str | None = None, selected: str | None = None, test: dict | None = None, n_test: int | None = None,
          champion: dict | None = None, comparison: dict | None = None, promoted: bool = False,
          regression: dict | None = None, changed: dict | None = None, message: str | None = None) -> dict:
    """One night in a trend. `champion` is the champion record after this run's decision;
    `comparison` the manifest's test.champion_comparison."""
    accuracy = None if test is None else test["accuracy"]
    return {
        "run_id": run_id, "at": at, "status": status, "flow_run_id": flow_run_id,
        "deployment": origin[0], "night": origin[1],
        "digest": digest, "selected": selected,
        "test": None if accuracy is None else {"accuracy": accuracy, "n": n_test,
                                               "ci": list(accuracy_interval(accuracy, n_test)) if n_test else None},
        "champion": None if champion is None else {"run_id": champion["run_id"],
                                                   "accuracy": champion["test"]["accuracy"]},
        "compared_with": None if not comparison else comparison["champion_run_id"],
        "difference": None if not comparison else comparison.get("difference"),
        "difference_ci": None if not comparison else comparison.get("ci"),
        "promoted": bool(promoted), "regression": regression is not None,
        "changed": changes(changed) if changed else [], "message": message,
    }


def trained_entry(manifest: dict, champion: dict | None) -> dict:
    t = manifest["test"]
    return entry(manifest["run_id"], "trained", manifest["created_at"], flow_run_id=manifest.get("flow_run_id"),
                 origin=origin(), digest=(manifest.get("fingerprint") or {}).get("digest"), selected=manifest["selected"],
                 test=t, n_test=manifest["dataset"]["sizes"]["test"], champion=champion,
                 comparison=t.get("champion_comparison"), promoted=manifest["promoted"],
                 regression=manifest.get("regression"), changed=manifest.get("changed_since_champion"),
                 message=(manifest.get("regression") or {}).get("sentence") or manifest["promotion_reason"])


def record(store, ident: str, new: dict) -> list[dict] | None:
    """Add `new` to the trend of `ident`; the entries as written. None, said, when the
    stored trend is unreadable: the trend is a record for people, and a damaged or planted
    one must not fail the run (store errors are raised: the task retries them)."""
    try:
        return trends.add(store, ident, new)[1]
    except ValueError as e:
        _warn(f"the trend was not updated: {e}")
        return None


def _warn(message: str) -> None:
    """A warning in the run's log (the UI shows it), or on stdout outside a run."""
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        print(message)


def artifact_key(ident: str) -> str:
    """Prefect's artifact keys: lowercase letters, digits and dashes."""
    return "trend-" + re.sub(r"[^a-z0-9]+", "-", ident.lower()).strip("-")[:90]


def table(entries: list[dict]) -> list[dict]:
    def pct(x):
        return "" if x is None else f"{x * 100:.2f}"

    rows = []
    for e in reversed(entries):  # newest first: what someone opening the page wants
        t, c = e.get("test") or {}, e.get("champion") or {}
        ci = t.get("ci")
        d, dci = e.get("difference"), e.get("difference_ci")
        rows.append({
            "night": e.get("night") or e["at"][:10], "status": e["status"], "run": e["run_id"],
            "selected": e.get("selected") or "", "test accuracy %": pct(t.get("accuracy")),
            "95% interval": "" if not ci else f"{ci[0] * 100:.2f} to {ci[1] * 100:.2f}",
            "champion %": pct(c.get("accuracy")),
            "vs champion (points)": "" if d is None else f"{d * 100:+.2f}" + (
                f" ({dci[0] * 100:+.2f} to {dci[1] * 100:+.2f})" if dci else ""),
            "promoted": "yes" if e.get("promoted") else "", "regression": "REGRESSION" if e.get("regression") else "",
            "changed": ", ".join(e.get("changed") or [])[:200],
        })
    return rows


def show(store, ident: str, entries: list[dict] | None = None) -> bool:
    """The trend's table artifact (one key per identity: the Artifacts page keeps its
    versions). Best-effort: False, logged, if the UI could not be updated."""
    try:
        if entries is None:
            entries = trends.read(store, ident)[1]
        create_table_artifact(table(entries), key=artifact_key(ident),
                              description=f"Dataset {ident}: every run's test accuracy night by night, newest first")
        return True
    except Exception as e:  # noqa: BLE001 - the trend is in the store; only its page was not updated
        _warn(f"the trend's table for {ident} was not updated ({type(e).__name__}: {e})")
        return False


def leave_superseded(store_uri: str, night: dict) -> None:
    """A superseded night's entry, left for the next run of its deployment to fold into its
    trend. Best-effort: the night ends Superseded whatever the store says."""
    from store import open_store

    if not night.get("deployment"):
        return
    try:
        where = trends.leave_superseded(open_store(store_uri), night["deployment"], night)
        print(f"trend entry left in {where}")
    except Exception as e:  # noqa: BLE001 - a missing trend entry must not keep a stale night running
        print(f"the superseded night's trend entry was not stored ({type(e).__name__}: {e})")


def record_failure(ctx, error: BaseException) -> None:
    """A run that failed once its dataset was known: its night in the trend, status failed.
    Through a store opened without the outage window (the run has waited it out already);
    best-effort: the run's own error is what matters."""
    from store import open_store
    from tasks.testing import champion_identity

    try:
        store = open_store(ctx.store_uri)
        ident = champion_identity(ctx)
        entries = record(store, ident, entry(
            ctx.run_id, "failed", ctx.created_at, flow_run_id=ctx.flow_run_id, origin=origin(),
            digest=None if ctx.fingerprint is None else ctx.fingerprint.digest,
            message=f"{type(error).__name__}: {error}"[:500]))
        if entries is not None:
            print(f"trend of {ident}: this run recorded as failed")
            show(store, ident, entries)
    except Exception as e:  # noqa: BLE001
        print(f"the failed run's trend entry was not stored ({type(e).__name__}: {e})")
