"""Pictures in the UI: the report's figures inlined, the live curves while a run trains,
both seen loaded in a real headless Chromium on a real Prefect server's UI."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cnn.augment
import run.live
from run.layout import TREND_PLOT
from run.report import (CONFUSION, CURVES, REPORT_IMAGES, VARIANTS, data_uri, plot_confusion, plot_curves,
                        plot_trend, plot_variants, render_markdown)
from tasks import trend
from tests import prefect_services
from tests.browser import Page
from tests.conftest import register_tiny
from tests.prefect_fixtures import client

NAMES = ["none", "flip", "crop", "flip-crop", "flip-crop-cutout", "flip-crop-jitter"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REPORT_LIMIT = 1_000_000  # bytes of markdown, pictures inlined, for a whole report in the UI
DATA_URI = re.compile(r"\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")
# every image on the page once all have settled: their natural widths (0: broken)
IMAGES_LOADED = ("(() => { const i = [...document.images].filter(x => x.src.startsWith('data:'));"
                 " return i.length && i.every(x => x.complete) ? i.map(x => x.naturalWidth) : null })()")


def _history(rng, epochs: int) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "val_loss": 2 / np.sqrt(e) + rng.normal(0, 0.03, epochs),
                         "val_accuracy": 0.9 - 0.5 / np.sqrt(e) + rng.normal(0, 0.01, epochs)})


def _manifest(variants: list[dict]) -> dict:
    return {"run_id": "r1", "selected": "flip", "params": {"model": "resnet", "select_metric": "val_accuracy"},
            "dataset": {"sizes": {"val": 6500, "test": 3500}, "source": "x", "md5": "m", "split_seed": 0},
            "test": {"accuracy": 0.9, "loss": 0.3, "per_class": dict.fromkeys(CLASSES, 0.9)},
            "promoted": True, "promotion_reason": "r", "device": "cpu", "git_sha": "g", "variants": variants}


def test_a_full_report_with_its_pictures_inlined_stays_small(tmp_path):
    """Six variants of three repeats, 30 epochs each, intervals, a 10-class confusion
    matrix: the UI's report with every picture inlined stays well under 1 MB."""
    rng = np.random.default_rng(0)
    plot_curves({v: [_history(rng, 30 - r) for r in range(3)] for v in NAMES}, tmp_path / CURVES)
    variants = [{"name": v, "status": "completed", "val_accuracy": 0.9 - i / 100, "val_accuracy_mean": 0.89 - i / 100,
                 "val_accuracy_ci": [0.88 - i / 100, 0.9 - i / 100]} for i, v in enumerate(NAMES)]
    variants.append({"name": "broken", "status": "failed", "val_accuracy": None})
    plot_variants(variants, "flip", tmp_path / VARIANTS)
    cm = rng.integers(0, 50, (10, 10))
    np.fill_diagonal(cm, 300)
    (tmp_path / "model").mkdir()
    plot_confusion(cm.tolist(), CLASSES, tmp_path / CONFUSION)
    # a year of nights in the dataset's trend, a promotion a month, a regression now and then
    t0 = datetime(2026, 1, 1, 2, tzinfo=timezone.utc)
    year = [trend.entry(f"run-{d}", "skipped" if d % 7 == 3 else "trained", (t0 + timedelta(days=d)).isoformat(),
                        test=None if d % 7 == 3 else {"accuracy": 0.85 + d / 5000 - (0.03 if d % 50 == 7 else 0)},
                        n_test=3500, champion={"run_id": "c", "test": {"accuracy": 0.85 + d / 5000}},
                        promoted=d % 30 == 0) for d in range(365)]
    plot_trend(year, tmp_path / TREND_PLOT, "cifar10-c58f30108f718f92721af3b95e74349a-split0-test3500")

    sizes = {name: (tmp_path / name).stat().st_size for name in REPORT_IMAGES}
    print(f"figures (bytes): {sizes}")
    for name in REPORT_IMAGES:
        img = Image.open(tmp_path / name)
        assert img.mode == "P" and 300 < img.width < 1000, (name, img.mode, img.size)  # palette, screen-sized
    ui = render_markdown(_manifest(variants), {}, images={n: data_uri((tmp_path / n).read_bytes()) for n in REPORT_IMAGES})
    print(f"report in the UI: {len(ui.encode())} bytes")
    assert len(DATA_URI.findall(ui)) == len(REPORT_IMAGES) == 4
    assert len(ui.encode()) < REPORT_LIMIT / 10  # well under: room for many more variants

    # the stored report links the same pictures relatively: nothing inlined, nothing that expires
    stored = render_markdown(_manifest(variants), {"manifest.json": "manifest.json"}, "s3://b/runs/r1")
    assert "data:" not in stored
    assert {f"({n})" for n in REPORT_IMAGES} <= set(re.findall(r"\([^)]*\.png\)", stored))


def test_curves_of_a_single_history_and_of_repeats(tmp_path):
    """A bare DataFrame is one repeat; a list draws mean and band; empty ones are skipped."""
    rng = np.random.default_rng(1)
    one = plot_curves({"none": _history(rng, 5), "empty": pd.DataFrame()}, tmp_path / "one.png")
    many = plot_curves({"none": [_history(rng, 5), _history(rng, 4)], "empty": []}, tmp_path / "many.png")
    assert Image.open(one).size == Image.open(many).size
    assert one.read_bytes() != many.read_bytes()


# ------------------------------------------------------------------ a real run on a real server

WATCHED: list[str | None] = []  # the live-curves artifact as the watched variant saw it, batch by batch


def _watch(x, g):
    """An augmentation step that reads the run's live-curves artifact from the server
    while training goes on: what a person watching would see, between epochs."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    arts = _live_artifacts(ArtifactFilter(key=ArtifactFilterKey(any_=[run.live.KEY]),
                                          flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.get_id()])))
    seen = arts[0].data if arts else None
    if not WATCHED or WATCHED[-1] != seen:
        WATCHED.append(seen)
    return x


def _live_artifacts(artifact_filter):
    from prefect import get_client

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=artifact_filter)


@pytest.fixture(scope="module")
def ui_run(server, synthetic_archive, tmp_path_factory) -> dict:
    """One small train-cifar run in this process against the module's Prefect server,
    the live curves redrawn every epoch (no 30 s wait in a test)."""
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    store = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp, prefect_services.api_url(server["PREFECT_API_URL"]):
        mp.setenv("TRAIN_CIFAR_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(run.live, "MIN_INTERVAL_S", 0.0)
        mp.setitem(cnn.augment.VARIANTS, "watched", [_watch])
        out = train_cifar(data_dir=str(path.parent), data_md5=md5, variants=["none", "watched"],
                          model=register_tiny(mp), epochs=3,
                          patience=3, subset=800, store=str(store), device="cpu")
    manifest = json.loads(Path(out["manifest"]).read_text())
    with client(server) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[manifest["flow_run_id"]])))
    return {"manifest": manifest, "store": store, "artifacts": arts, "watched": list(WATCHED),
            "ui": server["PREFECT_API_URL"].removesuffix("/api")}


def _only(arts, key: str):
    found = [a for a in arts if a.key == key]
    assert len(found) == 1, f"{len(found)} artifacts {key}"
    return found[0]


def _loaded_images(ui: str, artifact_id, profile: Path) -> list[int]:
    """The natural widths of the data-URI images on the artifact's page in the UI."""
    with Page(f"{ui}/artifacts/artifact/{artifact_id}", profile) as page:
        widths = page.wait_for(IMAGES_LOADED, timeout=90)
        assert widths, f"no images on the page; it shows: {page.evaluate('document.body.innerText')[:2000]}"
        return widths


@pytest.mark.slow
def test_report_in_the_ui_shows_its_pictures(ui_run, tmp_path):
    report = _only(ui_run["artifacts"], "report")
    inlined = DATA_URI.findall(report.data)
    print(f"report artifact: {len(report.data.encode())} bytes, {len(inlined)} pictures")
    assert len(inlined) == len(REPORT_IMAGES) and len(report.data.encode()) < REPORT_LIMIT
    assert "![Test accuracy night by night](data:image/png;base64," in report.data  # the trend's picture
    widths = _loaded_images(ui_run["ui"], report.id, tmp_path / "chromium")
    assert len(widths) == len(REPORT_IMAGES) and all(w > 0 for w in widths), widths

    # the stored report and its pictures: relative links to files that are there
    run = ui_run["store"] / "runs" / ui_run["manifest"]["run_id"]
    stored = (run / "report.md").read_text()
    assert "data:" not in stored and "X-Amz" not in stored
    for name in REPORT_IMAGES:
        assert f"]({name})" in stored and Image.open(run / name).width > 0, name
    assert VARIANTS in ui_run["manifest"]["artifacts"]


@pytest.mark.slow
def test_live_curves_change_between_epochs_and_show_in_the_ui(ui_run, tmp_path):
    # seen from inside the run: nothing of the variant before its first epoch (the other
    # variant's lines may be there: one CPU lane trains them in turn), then each epoch done
    seen = ui_run["watched"]
    assert seen[0] is None or "**watched**" not in seen[0], seen[0][:300]
    for epoch in (1, 2):
        assert any(s and f"**watched**: epoch {epoch} of at most 3" in s and DATA_URI.search(s) for s in seen), epoch
    # one artifact for the run, updated in place (no version per redraw), naming both variants' ends
    live = _only(ui_run["artifacts"], run.live.KEY)
    print(f"live-curves artifact: {len(live.data.encode())} bytes")
    assert len(live.data.encode()) < 100_000
    for v in ("none", "watched"):
        assert re.search(rf"- \*\*{v}\*\*: (completed|early_stopped), val_acc", live.data), live.data[:500]
    widths = _loaded_images(ui_run["ui"], live.id, tmp_path / "chromium")
    assert len(widths) == 1 and widths[0] > 0


@pytest.mark.slow
def test_live_curves_are_redrawn_at_most_every_interval_and_at_the_end(server):
    from prefect import flow
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.runtime import flow_run

    rows = [{"epoch": e, "val_loss": 1 / e, "val_accuracy": 0.5 + e / 20} for e in (1, 2, 3)]

    @flow(name="live-curves-rate")
    def watch() -> list[str]:
        f = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.get_id()]))
        shown = []
        for n in (1, 2, 3):
            run.live.show_curves("a", rows[:n], 10)  # within MIN_INTERVAL_S of each other
            shown.append([a.data for a in _live_artifacts(f)])
        run.live.show_curves("a", rows, 10, status="early_stopped")
        shown.append([a.data for a in _live_artifacts(f)])
        return shown

    with prefect_services.api_url(server["PREFECT_API_URL"]):
        shown = watch()
    assert all(len(s) == 1 for s in shown)  # one artifact all along
    assert "epoch 1 of at most 10" in shown[0][0] and shown[1] == shown[2] == shown[0]  # not redrawn within 30 s
    assert "**a**: early_stopped" in shown[3][0]  # but at the variant's end
