"""publish_run: the report, the manifest, the champion decision and the UI artifacts."""
from __future__ import annotations

import json

import pandas as pd
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from store import champion, open_store
from tasks.common import is_io_error, local_run_dir, run_key
from tasks.report import plot_curves, render_markdown, variants_table

VARIANT_FIELDS = ["name", "status", "epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds"]


@task(name="publish-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=is_io_error)
def publish_run(manifest: dict, test: dict, variants: list[dict], promote_margin: float, store_uri: str) -> dict:
    """Write report.md and manifest.json (last, so it is the run's seal); promote if it wins."""
    store = open_store(store_uri)
    run_id = manifest["run_id"]
    out = local_run_dir(run_id)
    artifacts: dict[str, dict] = {}
    for v in variants:
        artifacts.update(v.get("artifacts", {}))
    artifacts.update(test["artifacts"])

    histories = {v["name"]: pd.read_csv(out / "variants" / v["name"] / "history.csv")
                 for v in variants if (out / "variants" / v["name"] / "history.csv").is_file()
                 and (out / "variants" / v["name"] / "history.csv").stat().st_size > 1}
    plot_curves(histories, out / "curves.png")
    artifacts["curves.png"] = store.put_file(run_key(run_id, "curves.png"), out / "curves.png")

    manifest = {
        **manifest,
        "variants": [{k: v[k] for k in VARIANT_FIELDS} for v in variants],
        "test": {"loss": test["loss"], "accuracy": test["accuracy"], "per_class": test["per_class"]},
    }
    candidate = {
        "run_id": run_id, "model_uri": store.uri_for(run_key(run_id, "model")),
        "manifest_uri": store.uri_for(run_key(run_id, "manifest.json")),
        "variant": manifest["selected"], "model": manifest["params"]["model"],
        "test": manifest["test"], "dataset_md5": manifest["dataset"]["md5"],
        "split_seed": manifest["dataset"]["split_seed"], "test_size": manifest["dataset"]["sizes"]["test"],
        "created_at": manifest["created_at"],
    }
    # every file of the run is stored, the manifest included, before the champion is
    # touched; the manifest claims a promotion only once champion.json names this run
    promoted, reason = champion.decide(champion.read(store), candidate, promote_margin)

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
        final = seal(*champion.promote(store, candidate, promote_margin))
    print(f"promoted: {final['promoted']} ({final['promotion_reason']})")

    create_table_artifact(variants_table(final["variants"], final["selected"]), key="variant-comparison",
                          description=f"Run {run_id}: augmentation variants on validation")
    create_markdown_artifact(render_markdown(final, links), key="report", description=f"Run {run_id}: test report")
    create_link_artifact(links["manifest.json"], "manifest.json", key="manifest", description=f"Run {run_id} manifest")
    create_link_artifact(links["model/model.pt2"], "portable model", key="model",
                         description=f"Run {run_id}: torch.export program, loads with torch alone")
    create_link_artifact(links["report.md"], "report.md", key="report-file", description=f"Run {run_id} report")
    return {"run_id": run_id, "manifest": store.uri_for(run_key(run_id, "manifest.json")),
            "promoted": final["promoted"], "test_accuracy": final["test"]["accuracy"], "selected": final["selected"]}
