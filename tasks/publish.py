"""publish_run: the report, the manifest, the champion decision and the UI artifacts."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from store import champion, open_store
from cnn.data import split_sizes
from tasks.common import is_io_error, local_run_dir, run_key, variant_key
from tasks.report import plot_curves, render_markdown, variants_table
from tasks.results import VariantResult

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
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "prefect": prefect.__version__}


def build_manifest(run: dict, params: dict, dataset: dict, results: list[VariantResult], selected: VariantResult,
                   test: dict) -> dict:
    """The run's manifest (design.md), less the promotion and the artifacts, which publish adds."""
    train_size = min(dataset["train"], params.get("subset") or dataset["train"])
    n_val, n_test = split_sizes(dataset["holdout"])
    return {
        "run_id": run["run_id"],
        "created_at": run["created_at"],
        "git_sha": git_sha(),
        "params": params,
        "configs": {r.name: r.config for r in results if r.config},
        "dataset": {"name": dataset["name"], "source": dataset["source"], "md5": dataset["md5"],
                    "sizes": {"train": train_size, "val": n_val, "test": n_test},
                    "split_seed": params["split_seed"], "classes": dataset["classes"]},
        "variants": [r.summary() for r in results],
        "selected": selected.name,
        "test": {"loss": test["loss"], "accuracy": test["accuracy"], "per_class": test["per_class"]},
        "versions": versions(),
        "device": selected.device,
        "flow_run_id": run["flow_run_id"],
        "variant_deployment": params.get("variant_deployment"),
    }


@task(name="publish-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=is_io_error)
def publish_run(run: dict, params: dict, dataset: dict, results: list[VariantResult], selected: VariantResult,
                test: dict, store_uri: str) -> dict:
    """Write report.md and manifest.json (last, so it is the run's seal); promote if it wins."""
    store = open_store(store_uri, outage_minutes=params.get("store_outage_minutes"))  # waits out an outage
    run_id = run["run_id"]
    out = local_run_dir(run_id)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(run, params, dataset, results, selected, test)
    artifacts: dict[str, dict] = {}
    for r in results:
        artifacts.update(r.artifacts)
    artifacts.update(test["artifacts"])

    histories = {}
    for r in results:  # each variant's history, from the store (it may have trained on another machine)
        key = variant_key(run_id, r.name, "history.csv")
        if store.exists(key):
            local = store.get_file(key, out / "variants" / r.name / "history.csv")
            if local.stat().st_size > 1:  # a variant that diverged in its first epoch has an empty one
                histories[r.name] = pd.read_csv(local)
    plot_curves(histories, out / "curves.png")
    artifacts["curves.png"] = store.put_file(run_key(run_id, "curves.png"), out / "curves.png")

    candidate = {
        "run_id": run_id, "model_uri": store.uri_for(run_key(run_id, "model")),
        "manifest_uri": store.uri_for(run_key(run_id, "manifest.json")),
        "variant": manifest["selected"], "model": params["model"],
        "test": manifest["test"], "dataset_md5": manifest["dataset"]["md5"],
        "split_seed": manifest["dataset"]["split_seed"], "test_size": manifest["dataset"]["sizes"]["test"],
        "created_at": manifest["created_at"],
    }
    margin = params["promote_margin"]
    # every file of the run is stored, the manifest included, before the champion is
    # touched; the manifest claims a promotion only once champion.json names this run
    promoted, reason = champion.decide(champion.read(store), candidate, margin)

    links = {name: store.link_for(run_key(run_id, *name.split("/"))) for name in
             ["manifest.json", "report.md", "model/weights.safetensors", "model/model.pt2", "curves.png"]}

    def seal(promoted: bool, reason: str) -> dict:
        m = {**manifest, "promoted": promoted, "promotion_reason": reason}
        (out / "report.md").write_text(render_markdown(m, links))
        arts = {**artifacts, "report.md": store.put_file(run_key(run_id, "report.md"), out / "report.md")}
        m["artifacts"] = arts
        (out / "manifest.json").write_text(json.dumps(m, indent=2))
        store.put_file(run_key(run_id, "manifest.json"), out / "manifest.json")
        return m

    final = seal(False, f"pending: {reason}" if promoted else reason)
    if promoted:  # decided again inside promote(): another run may have won meanwhile
        final = seal(*champion.promote(store, candidate, margin))
    print(f"promoted: {final['promoted']} ({final['promotion_reason']})")

    create_table_artifact(variants_table(final["variants"], final["selected"]), key="variant-comparison",
                          description=f"Run {run_id}: augmentation variants on validation (final)")
    create_markdown_artifact(render_markdown(final, links), key="report", description=f"Run {run_id}: test report")
    create_link_artifact(links["manifest.json"], "manifest.json", key="manifest", description=f"Run {run_id} manifest")
    create_link_artifact(links["model/model.pt2"], "portable model", key="model",
                         description=f"Run {run_id}: torch.export program, loads with torch alone")
    create_link_artifact(links["report.md"], "report.md", key="report-file", description=f"Run {run_id} report")
    return {"run_id": run_id, "manifest": store.uri_for(run_key(run_id, "manifest.json")),
            "promoted": final["promoted"], "test_accuracy": final["test"]["accuracy"], "selected": final["selected"]}
