"""The run's page in the Prefect UI, best-effort, after publish: kept out of publish-run
so an API hiccup never re-runs the champion decision or fails a sealed run."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from run.context import RunContext
from run.layout import MANIFEST, REPORT, run_key
from run.report import HALVING_IMAGES, REPORT_IMAGES, data_uri, render_markdown, variants_table
from store import open_store
from tasks import trend
from tasks.publish import REPORT_FILES


@task(name="create-run-artifacts", cache_policy=NO_CACHE)
def create_run_artifacts(ctx: RunContext) -> bool:
    """False if the UI could not be updated (logged; the run stays as published)."""
    try:
        _create(ctx.run_id, ctx.store_uri, ctx.params.link_expiry_hours)
        return True
    except Exception as e:  # noqa: BLE001 - best-effort by design: the run is already sealed
        get_run_logger().warning(f"run {ctx.run_id}: the UI's artifacts were not created ({type(e).__name__}: {e}); "
                                 f"the run's files are in {open_store(ctx.store_uri).uri_for(run_key(ctx.run_id))}")
        return False


def _create(run_id: str, store_uri: str, link_expiry_hours: int) -> None:
    # opened here, without the run's outage window: a store that is away now costs the
    # UI its artifacts, not the run minutes of waiting
    store = open_store(store_uri)
    manifest = store.read_json(run_key(run_id, MANIFEST))
    # presigned S3 links carry the signer's access key id (and session token): they live
    # in Prefect's database for link_expiry_hours only, never in the store
    links = {name: store.link_for(run_key(run_id, *name.split("/")), link_expiry_hours * 3600)
             for name in REPORT_FILES}
    create_table_artifact(variants_table(manifest["variants"], manifest["selected"]), key="variant-comparison",
                          description=f"Run {run_id}: augmentation variants on validation (final)")
    create_markdown_artifact(render_markdown(manifest, links, images=_inline_images(store, run_id)), key="report",
                             description=f"Run {run_id}: test report")
    create_link_artifact(links[MANIFEST], MANIFEST, key="manifest", description=f"Run {run_id} manifest")
    create_link_artifact(links["model/model.pt2"], "portable model", key="model",
                         description=f"Run {run_id}: torch.export program, loads with torch alone")
    create_link_artifact(links[REPORT], REPORT, key="report-file", description=f"Run {run_id} report")
    if manifest["dataset"].get("identity"):
        trend.show(store, manifest["dataset"]["identity"])


def _inline_images(store, run_id: str) -> dict[str, str]:
    """Data URIs: a browser will not open a file:// link from a web page, and a presigned one expires."""
    found = {name: store.read_versioned(run_key(run_id, *name.split("/")))[0]
             for name in {**REPORT_IMAGES, **HALVING_IMAGES}}
    return {name: data_uri(png) for name, png in found.items() if png is not None}
