"""publish_run: the report, the manifest and the champion decision."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from registry import champions
from run.cache import local_run_dir
from run.context import RunContext
from run.errors import is_io_error
from run.fingerprint import torchvision_version
from run.layout import (CURVES, HISTORY, MANIFEST, REPORT, RUNGS_PLOT, TREND_PLOT, VARIANTS_PLOT, run_key, stored_key,
                        units_of)
from run.records import ChampionComparison, ChampionRecord, TestResult, VariantComparison, VariantScore
from run.report import TITLES, plot_curves, plot_rungs, plot_trend, plot_variants, render_markdown
from store import MAX_DOCUMENT_BYTES
from store.files import write_durably
from tasks import trend
from tasks.testing import face_champion_again

NOT_COMPARED = "train-cifar.champion.not-compared"

def git_sha() -> str:
    """The code's commit: GIT_SHA (set in the image, which has no .git), else git's answer."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import prefect
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision_version(), "prefect": prefect.__version__}


def build_manifest(ctx: RunContext, scores: list[VariantScore], selected: VariantScore, test: TestResult,
                   comparison: VariantComparison | None = None) -> dict:
    """The manifest (README, "What a run writes") less what publish adds: promotion, artifacts."""
    p, ds = ctx.params, ctx.dataset
    n_val, n_test = ds.split_sizes()  # less the purged hold-out images
    purge = ({"purged": len(ds.purged), "purged_tag": ds.purged_tag}
             if p.purge_test_duplicates or ds.purged else {})
    return {
        "run_id": ctx.run_id,
        "created_at": ctx.created_at,
        "git_sha": git_sha(),
        "params": p.model_dump(),
        "configs": {s.name: s.config for s in scores if s.config},
        "dataset": {"name": ds.name, "source": ds.source, "md5": ds.md5,
                    "sizes": {"train": min(ds.train, p.subset or ds.train), "val": n_val, "test": n_test},
                    "split_seed": p.split_seed, "classes": ds.classes, **purge},
        "data_checks": ctx.data_checks,
        "variants": [s.summary() for s in scores],
        "selected": selected.name,
        "comparison": None if comparison is None else comparison.to_dict(),
        "test": test.summary(),
        "versions": versions(),
        "device": selected.device,
        "flow_run_id": ctx.flow_run_id,
        "variant_deployment": p.variant_deployment,
        **fingerprint_fields(ctx),
        **effort_fields(ctx, scores),
    }


def effort_fields(ctx: RunContext, scores: list[VariantScore]) -> dict:
    """`halving` (with halving on: its settings and every rung's decision) and `budget` (with
    budget_gpu_hours: the limit, the device seconds each unit used, whether it ended the run);
    absent otherwise, so a manifest without them is as before."""
    p, out = ctx.params, {}
    if p.halving == "on":
        from run.halving import decisions

        out["halving"] = {"min_epochs": p.halving_min_epochs, "factor": p.halving_factor, "rungs": decisions(ctx)}
    if p.budget_gpu_hours is not None:
        from run.budget import Budget

        used = Budget(ctx.store, ctx.run_id, p.budget_gpu_hours * 3600).summary()
        stopped = [s.name + (f" seed {r['seed']}" if len(s.repeats) > 1 else "")
                   for s in scores for r in s.repeats if r["status"] == "stopped_by_budget"]
        out["budget"] = {**used, "gpu_hours": p.budget_gpu_hours, "ended_run": bool(stopped), "stopped": stopped}
    return out


def fingerprint_fields(ctx: RunContext) -> dict:
    """The manifest's `fingerprint` ({digest, parts}) and, against the champion's run it was
    compared with, `changed_since_champion` ({part: {champion, now}}; null: no champion)."""
    fp = ctx.fingerprint
    if fp is None:
        return {"fingerprint": None, "fingerprint_compared_with": None, "changed_since_champion": None}
    return {"fingerprint": fp.to_dict(), "fingerprint_compared_with": fp.champion_run_id,
            "changed_since_champion": fp.changed_since_champion}


def champion_record(manifest: dict, store) -> ChampionRecord:
    """What the registry records of the run whose manifest this is."""
    d = manifest["dataset"]
    run_id = manifest["run_id"]
    return ChampionRecord(
        run_id=run_id, model_uri=store.uri_for(run_key(run_id, "model")),
        manifest_uri=store.uri_for(run_key(run_id, MANIFEST)),
        variant=manifest["selected"], model=manifest["params"]["model"], test=manifest["test"],
        dataset_name=d["name"], dataset_md5=d["md5"], split_seed=d["split_seed"],
        test_size=d["sizes"]["test"], created_at=manifest["created_at"],
        fingerprint=(manifest.get("fingerprint") or {}).get("digest"),
        dataset_purged=d.get("purged_tag"),
    )


REPORT_FILES = [MANIFEST, REPORT, "model/weights.safetensors", "model/model.pt2", CURVES]


class ChampionJudge:
    """champions.Judge: the test's comparison with the champion it faced; a champion that
    changed since (another run won meanwhile) is faced again, once. `final` is the
    comparison the last answer rests on."""

    def __init__(self, tested: ChampionComparison | None, face_again: Callable[[dict], ChampionComparison]):
        self.tested, self.face_again = tested, face_again
        self.final: ChampionComparison | None = None

    def __call__(self, current: dict, candidate: dict) -> tuple[bool, str]:
        c = next((c for c in (self.final, self.tested)
                  if c is not None and c.champion_run_id == current["run_id"]), None)
        self.final = c if c is not None else self.face_again(current)
        return self.final.promoted, self.final.reason


@task(name="publish-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=is_io_error)
def publish_run(ctx: RunContext, scores: list[VariantScore], selected: VariantScore, test: TestResult,
                comparison: VariantComparison | None = None) -> dict:
    """Write report.md and manifest.json (last: the run's seal); promote if it wins.

    Safe to retry: every write replaces itself, and a champion that already names this
    run records the promotion that was made."""
    store = ctx.store
    run_id = ctx.run_id
    out = local_run_dir(run_id)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(ctx, scores, selected, test, comparison)
    artifacts = {**{k: v for s in scores for k, v in s.artifacts.items()}, **test.artifacts}

    plot_curves(_histories(ctx, scores), out / CURVES)
    artifacts[CURVES] = store.put_file(run_key(run_id, CURVES), out / CURVES)
    plot_variants(manifest["variants"], manifest["selected"], out / VARIANTS_PLOT)
    artifacts[VARIANTS_PLOT] = store.put_file(run_key(run_id, VARIANTS_PLOT), out / VARIANTS_PLOT)
    if manifest.get("halving", {}).get("rungs"):
        # where the units that went on ended: their best, drawn at the last epoch (an early stop's best stays)
        final = {s.name + (f"-s{r['seed']}" if len(s.repeats) > 1 else ""): (ctx.params.epochs, r["val_accuracy"])
                 for s in scores for r in s.repeats}
        plot_rungs(manifest["halving"]["rungs"], out / RUNGS_PLOT, final)
        artifacts[RUNGS_PLOT] = store.put_file(run_key(run_id, RUNGS_PLOT), out / RUNGS_PLOT)

    candidate = champion_record(manifest, store).to_dict()
    ident = champions.identity(candidate)
    manifest["dataset"]["identity"] = ident
    judge = ChampionJudge(test.champion_comparison, lambda current: face_champion_again(ctx, current))

    # the manifest is stored before the champion is touched, and claims a promotion only
    # once the champion names this run
    current = champions.read(store, ident)
    promoted, reason = champions.decide(current, candidate, judge)
    # report.md stays in the store: relative links, never presigned ones (credentials, expiry)
    folder = store.uri_for(run_key(run_id))

    def compose(promoted: bool, reason: str, compared_with: str | None) -> dict:
        m = {**manifest, "promoted": promoted, "promotion_reason": reason, "compared_with": compared_with,
             "regression": None}
        if judge.final is not None and judge.final.champion_run_id == compared_with:
            m["test"] = {**m["test"], "champion_comparison": judge.final.to_dict()}
        versus = m["test"].get("champion_comparison")
        if versus and not promoted:
            # what changed is known against the champion the fingerprint was compared with
            same = m.get("fingerprint_compared_with") == versus["champion_run_id"]
            m["regression"] = trend.regression(versus, ctx.params.regression_margin,
                                               m.get("changed_since_champion") if same else None,
                                               ctx.params.promote_confidence)
        return m

    def seal(m: dict) -> dict:
        shown = {name: name for name in TITLES if name in artifacts}  # a trend that could not be drawn is left out
        write_durably(out / REPORT, render_markdown(m, {name: name for name in REPORT_FILES}, folder,
                                                    images=shown).encode())
        arts = {**artifacts, REPORT: store.put_file(run_key(run_id, REPORT), out / REPORT)}
        m = {**m, "artifacts": arts}
        write_durably(out / MANIFEST, json.dumps(m, indent=2).encode())
        store.put_file(run_key(run_id, MANIFEST), out / MANIFEST)
        return m

    decision = champions.Decision(False, f"pending: {reason}" if promoted else reason,
                                  None if current is None else current["run_id"])
    seal(compose(*decision))
    if promoted:  # decided again inside promote(): another run may have won meanwhile
        decision = champions.promote(store, candidate, judge, flow_run_id=ctx.flow_run_id)
    m = compose(*decision)
    # the night in the dataset's trend, then its picture; the manifest is sealed again with it
    entries = trend.record(store, ident, trend.trained_entry(m, champions.read(store, ident)))
    if entries is not None:
        plot_trend(entries, out / TREND_PLOT, ident)
        artifacts[TREND_PLOT] = store.put_file(run_key(run_id, TREND_PLOT), out / TREND_PLOT)
    final = seal(m)
    if final["regression"]:
        print(f"regression: {final['regression']['sentence']}")
        trend.emit_regression(final, store.uri)
    print(f"promoted: {final['promoted']} ({final['promotion_reason']})")
    if decision.compared_with is None:
        not_compared(store, run_id, ident, decision)
    return {"run_id": run_id, "manifest": store.uri_for(run_key(run_id, MANIFEST)),
            "promoted": final["promoted"], "test_accuracy": final["test"]["accuracy"], "selected": final["selected"],
            "dataset_identity": ident, "compared_with": decision.compared_with,
            "regression": final["regression"]}


def _histories(ctx: RunContext, scores: list[VariantScore]) -> dict[str, list[pd.DataFrame]]:
    """Every repeat's history by variant, from the store: a unit may have trained elsewhere."""
    store, run_id = ctx.store, ctx.run_id
    histories: dict[str, list[pd.DataFrame]] = {}
    for unit in units_of([s.name for s in scores], ctx.params.seed, ctx.params.repeats):
        key = stored_key(store, run_id, unit, HISTORY)
        if key is not None:
            # a few kB; a planted huge one is refused (TooLarge) before it is downloaded
            local = store.get_file(key, local_run_dir(run_id, "variants", *unit.folder.split("/"), HISTORY),
                                   limit=MAX_DOCUMENT_BYTES)
            if local.stat().st_size > 1:  # a variant that diverged in its first epoch has an empty one
                histories.setdefault(unit.variant, []).append(pd.read_csv(local))
    return histories


def not_compared(store, run_id: str, ident: str, decision: champions.Decision) -> None:
    """Said, and emitted for an automation to alert on."""
    others = sorted(set(champions.documents(store)) - {ident})
    print(f"not compared: no champion of dataset {ident} to compare with"
          + (f" (champions of other datasets: {', '.join(others)})" if others else ""))
    emit_event(event=NOT_COMPARED, resource={"prefect.resource.id": f"train-cifar.run.{run_id}",
                                             "prefect.resource.name": run_id},
               payload={"run_id": run_id, "dataset_identity": ident, "promoted": decision.promoted,
                        "reason": decision.reason, "other_identities": others, "store": store.uri})
