"""Night over night: the trend per dataset identity (registry/trends.py), its entries and the
regression rule (tasks/trend.py), its picture and its command line. The same through a real
Prefect server, worker and automation: tests/test_skip.py."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from cli import champion as cli
from registry import trends
from run.report import plot_trend
from store import LocalStore, open_store
from tasks import trend

IDENT = "synthetic-0123456789abcdef0123456789abcdef-split0-test210"
T0 = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)


def night(i: int, status: str = "trained", accuracy: float | None = 0.8, promoted: bool = False,
          regression: bool = False, deployment: str | None = "nightly", **extra) -> dict:
    at = (T0 + timedelta(days=i)).isoformat()
    e = trend.entry(f"run-{i:03d}", status, at, origin=(deployment, at[:10]),
                    test=None if accuracy is None else {"accuracy": accuracy}, n_test=3500,
                    champion={"run_id": "run-000", "test": {"accuracy": 0.8}}, promoted=promoted)
    return {**e, "regression": regression, **extra}


# ---------------------------------------------------------------- the store's trend


def test_entries_are_kept_oldest_first_one_per_run(tmp_path):
    st = LocalStore(tmp_path)
    trends.add(st, IDENT, night(2), now=T0 + timedelta(days=3))
    trends.add(st, IDENT, night(0, promoted=True), now=T0 + timedelta(days=3))
    trends.add(st, IDENT, night(1, "failed", accuracy=None), now=T0 + timedelta(days=3))
    # the failed run retried until it trained: its entry is replaced, not added
    summary, entries = trends.add(st, IDENT, night(1, accuracy=0.82), now=T0 + timedelta(days=3))
    assert summary is None
    assert [(e["run_id"], e["status"]) for e in entries] == [("run-000", "trained"), ("run-001", "trained"),
                                                            ("run-002", "trained")]
    assert trends.read(st, IDENT) == (None, entries)
    raw = (tmp_path / "trends" / f"{IDENT}.jsonl").read_text()
    assert len(raw.splitlines()) == 3 and all(json.loads(line)["run_id"] for line in raw.splitlines())
    assert trends.identities(st) == [IDENT]


def test_entries_beyond_the_retention_are_dropped_and_counted_in_the_summary(tmp_path):
    st = LocalStore(tmp_path)
    now = T0 + timedelta(days=trends.RETENTION_DAYS + 5.5)
    for i in range(8):  # nights 0..5 are older than the retention at `now`
        trends.add(st, IDENT, night(i, promoted=i == 0, regression=i == 3, accuracy=0.8 + i / 100,
                                    status="skipped" if i == 4 else "trained"), now=now)
    summary, entries = trends.read(st, IDENT)
    assert [e["run_id"] for e in entries] == ["run-006", "run-007"]
    assert summary["entries"] == 6 and summary["by_status"] == {"trained": 5, "skipped": 1}
    assert summary["promoted"] == 1 and summary["regressions"] == 1
    assert summary["first"] == night(0)["at"] and summary["last"] == night(5)["at"]
    assert summary["best_test_accuracy"] == pytest.approx(0.85)
    assert json.loads((tmp_path / "trends" / f"{IDENT}.jsonl").read_text().splitlines()[0]) == {"summary": summary}


def test_a_trend_keeps_at_most_max_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(trends, "MAX_ENTRIES", 3)
    st = LocalStore(tmp_path)
    for i in range(5):
        summary, entries = trends.add(st, IDENT, night(i), now=T0 + timedelta(days=6))
    assert [e["run_id"] for e in entries] == ["run-002", "run-003", "run-004"]
    assert summary["entries"] == 2


def test_superseded_nights_wait_for_the_next_run_of_their_deployment(tmp_path):
    st = LocalStore(tmp_path)
    now = T0 + timedelta(days=5)
    for i in (1, 2):
        trends.leave_superseded(st, "nightly", night(i, "superseded", accuracy=None))
    trends.leave_superseded(st, "nightly", night(2, "superseded", accuracy=None))  # a retry: no second copy
    # a run of another deployment does not take them
    _, entries = trends.add(st, IDENT, night(0, deployment="local"), now=now)
    assert [e["run_id"] for e in entries] == ["run-000"]
    _, entries = trends.add(st, IDENT, night(3), now=now)
    assert [(e["run_id"], e["status"]) for e in entries] == [
        ("run-000", "trained"), ("run-001", "superseded"), ("run-002", "superseded"), ("run-003", "trained")]
    _, entries = trends.add(st, IDENT, night(4), now=now)  # folded once
    assert [e["run_id"] for e in entries].count("run-001") == 1 and len(entries) == 5


def test_a_deployment_name_with_spaces_or_dots_gets_a_folder_of_its_own(tmp_path, capsys):
    """Prefect allows spaces and dots in deployment names; store keys do not."""
    st = LocalStore(tmp_path)
    for i, name in enumerate(("nightly run", "nightly.run", "nightly"), 1):
        trends.leave_superseded(st, name, night(i, "superseded", accuracy=None, deployment=name))
    folders = sorted(p.name for p in (tmp_path / "trends" / "superseded").iterdir())
    assert len(folders) == 3 and "nightly" in folders and all(" " not in f for f in folders), folders
    # a damaged or planted file among the waiting ones costs only itself
    (tmp_path / "trends" / "superseded" / "nightly" / "run-planted.json").write_text("[1, 2]")
    _, entries = trends.add(st, IDENT, night(20, deployment="nightly run"), now=T0 + timedelta(days=30))
    assert [(e["run_id"], e["deployment"]) for e in entries] == [("run-001", "nightly run"), ("run-020", "nightly run")]
    _, entries = trends.add(st, IDENT, night(21, deployment="nightly"), now=T0 + timedelta(days=30))
    assert [e["run_id"] for e in entries] == ["run-001", "run-003", "run-020", "run-021"]
    assert "run-planted" not in str(entries)
    assert "left out of the trend" in capsys.readouterr().out


def test_waiting_entries_are_read_until_taken_in_and_a_huge_planted_one_costs_only_itself(tmp_path, monkeypatch):
    from store.base import MAX_DOCUMENT_BYTES

    st = LocalStore(tmp_path)
    trends.leave_superseded(st, "nightly", night(1, "superseded", accuracy=None))
    big = tmp_path / "trends" / "superseded" / "nightly" / "run-huge.json"
    big.write_bytes(b" " * (MAX_DOCUMENT_BYTES + 1))
    read = []
    real = LocalStore.read_versioned
    monkeypatch.setattr(LocalStore, "read_versioned", lambda self, key, *a, **k: (read.append(key), real(self, key,
                                                                                                        *a, **k))[1])
    _, entries = trends.add(st, IDENT, night(2), now=T0 + timedelta(days=3))
    assert [e["run_id"] for e in entries] == ["run-001", "run-002"]
    read.clear()
    trends.add(st, IDENT, night(3), now=T0 + timedelta(days=3))
    waiting = [k for k in read if "/superseded/" in k]
    assert waiting == ["trends/superseded/nightly/run-huge.json"], waiting  # run-001's is not read again


@pytest.mark.parametrize("line, found", [
    ("not json", "not JSON"),
    ('{"run_id": "r", "at": "2026-12-01T02:00:00+00:00", "status": "won"}', "'status' one of"),
    ('{"run_id": "r", "at": "yesterday", "status": "trained"}', "ISO date"),
    ('{"at": "2026-12-01T02:00:00+00:00", "status": "trained"}', "'run_id'"),
    ('{"run_id": "r", "at": "2026-12-01T02:00:00+00:00", "status": "trained", "test": {"accuracy": "high"}}',
     "'test' with 'accuracy'"),
])
def test_a_damaged_trend_is_refused_naming_the_file_and_line_and_does_not_fail_the_run(tmp_path, line, found,
                                                                                       capsys):
    st = LocalStore(tmp_path)
    trends.add(st, IDENT, night(0))
    path = tmp_path / "trends" / f"{IDENT}.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=found) as e:
        trends.read(st, IDENT)
    assert f"{IDENT}.jsonl line 2" in str(e.value)
    # a run adding its night says so and goes on; the damaged object is left as it was
    before = path.read_bytes()
    assert trend.record(st, IDENT, night(1)) is None
    assert "the trend was not updated" in capsys.readouterr().out and path.read_bytes() == before


def _concurrent(store_factory, writers: int = 4, each: int = 5) -> None:
    go = threading.Barrier(writers)
    errors = []

    def write(w: int):
        st = store_factory()
        go.wait()
        try:
            for i in range(each):
                trends.add(st, IDENT, night(100 * w + i, deployment=None))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _, entries = trends.read(store_factory(), IDENT)
    assert sorted(e["run_id"] for e in entries) == sorted(f"run-{100 * w + i:03d}" for w in range(writers)
                                                          for i in range(each))


def test_concurrent_runs_adding_to_one_trend_lose_nothing_on_s3(s3_bucket):
    """Four runs at once, five nights each, each with its own client, on a real S3 endpoint."""
    _concurrent(lambda: open_store(f"s3://{s3_bucket}/nightly"))


def test_concurrent_runs_adding_to_one_trend_lose_nothing_in_a_folder(tmp_path):
    _concurrent(lambda: LocalStore(tmp_path))


# ---------------------------------------------------------------- the regression rule


# as Fingerprint.compared gives it: only the keys that differ
CHANGED = {"params": {"champion": {"lr": 0.05}, "now": {"lr": 1e-6}},
           "environment": {"champion": {"torch": "2.14.1"}, "now": {"torch": "2.15.0"}},
           "code": {"champion": "a" * 64, "now": "b" * 64}}


def _versus(difference: float, low: float, high: float) -> dict:
    return {"champion_run_id": "champ", "difference": difference, "ci": [low, high], "method": "m",
            "promote": False, "reason": "r"}


def test_worse_beyond_noise_is_a_regression_naming_what_changed():
    r = trend.regression(_versus(-0.018, -0.024, -0.012), 0.0, CHANGED, 0.95)
    assert r["champion_run_id"] == "champ" and r["ci"] == [-0.024, -0.012] and r["margin"] == 0.0
    assert r["changed"] == ["params.lr 0.05 -> 1e-06", "environment.torch 2.14.1 -> 2.15.0", "code"]
    assert "worse than champion champ by 1.80 points (95% interval -2.40 to -1.20)" in r["sentence"]
    assert "environment.torch 2.14.1 -> 2.15.0" in r["sentence"] and "code" in r["sentence"]


def test_within_noise_or_within_the_margin_is_not_a_regression():
    assert trend.regression(_versus(-0.01, -0.03, 0.01), 0.0, CHANGED, 0.95) is None  # the interval holds 0
    assert trend.regression(_versus(0.0, 0.0, 0.0), 0.0, {}, 0.95) is None  # the same model: upper bound 0
    assert trend.regression(_versus(-0.018, -0.024, -0.012), 0.015, CHANGED, 0.95) is None  # inside the margin
    assert trend.regression(_versus(-0.018, -0.024, -0.012), 0.01, CHANGED, 0.95) is not None
    assert trend.regression(None, 0.0, CHANGED, 0.95) is None  # no champion
    # a champion that could not be faced has no numbers: nothing says the model is worse
    assert trend.regression({"champion_run_id": "champ", "difference": None, "ci": None}, 0.0, CHANGED, 0.95) is None


def test_a_regression_with_nothing_changed_says_so():
    r = trend.regression(_versus(-0.2, -0.3, -0.1), 0.0, {}, 0.95)
    assert "nothing in the fingerprint changed" in r["sentence"] and r["changed"] == []


def test_changes_name_each_differing_key_of_a_part():
    assert trend.changes(CHANGED) == ["params.lr 0.05 -> 1e-06", "environment.torch 2.14.1 -> 2.15.0", "code"]
    # a value too long for a line is cut; a part that is not a mapping is shown whole
    named = trend.changes({"environment": {"champion": {"image": "x" * 60}, "now": {"image": None}},
                           "dataset": {"champion": None, "now": "y"}})
    assert named == [f"environment.image {'x' * 12}... -> null", "dataset null -> y"]
    assert trend.changes(None) == [] and trend.changes({}) == []


def test_the_trend_entry_of_a_trained_run_has_its_interval_and_the_champion_after_the_decision():
    manifest = {"run_id": "r2", "created_at": "2026-12-07T02:00:00+00:00", "flow_run_id": "f",
                "fingerprint": {"digest": "d" * 64}, "selected": "flip", "dataset": {"sizes": {"test": 3500}},
                "test": {"accuracy": 0.9, "champion_comparison": _versus(0.01, 0.002, 0.018)},
                "promoted": True, "promotion_reason": "beats", "regression": None,
                "changed_since_champion": {"params": {"champion": {"lr": 0.05}, "now": {"lr": 0.1}}}}
    e = trend.trained_entry(manifest, {"run_id": "r2", "test": {"accuracy": 0.9}})
    assert e["status"] == "trained" and e["promoted"] and not e["regression"]
    assert e["test"]["n"] == 3500 and e["test"]["ci"][0] < 0.9 < e["test"]["ci"][1]
    assert e["test"]["ci"] == pytest.approx([0.8897, 0.9095], abs=1e-3)
    assert e["champion"] == {"run_id": "r2", "accuracy": 0.9} and e["compared_with"] == "champ"
    assert e["changed"] == ["params.lr 0.05 -> 0.1"] and e["difference_ci"] == [0.002, 0.018]
    assert trends.check_entry(e, "x") is e


# ---------------------------------------------------------------- the picture, the table, the CLI


def test_the_trend_picture_shows_every_kind_of_night(tmp_path):
    entries = [night(0, promoted=True), night(1, "skipped", accuracy=None), night(2, accuracy=0.6, regression=True),
               night(3, "superseded", accuracy=None), night(4, "failed", accuracy=None), night(5, accuracy=0.81)]
    plot_trend(entries, tmp_path / "trend.png", IDENT)
    img = Image.open(tmp_path / "trend.png")
    assert img.mode == "P" and 300 < img.width < 1000
    plot_trend([], tmp_path / "empty.png")  # a trend with nothing yet still draws
    assert Image.open(tmp_path / "empty.png").width > 0


def test_the_table_is_newest_first_with_regressions_named():
    rows = trend.table([night(0, promoted=True), night(1, accuracy=0.6, regression=True, changed=["params.lr a -> b"])])
    assert [r["run"] for r in rows] == ["run-001", "run-000"]
    assert rows[0]["regression"] == "REGRESSION" and rows[0]["changed"] == "params.lr a -> b"
    assert rows[1]["promoted"] == "yes" and rows[1]["test accuracy %"] == "80.00"
    assert trend.artifact_key("synthetic-ABC_1.x-purged3-ab12") == "trend-synthetic-abc-1-x-purged3-ab12"


def test_the_cli_prints_the_trend_oldest_first(tmp_path, capsys):
    st = LocalStore(tmp_path)
    trends.add(st, IDENT, night(0, promoted=True), now=T0)
    trends.add(st, IDENT, night(1, accuracy=0.6, regression=True), now=T0)
    assert cli.main(["--store", str(tmp_path), "trend"]) == 0
    out = capsys.readouterr().out
    assert f"dataset {IDENT}: 2 run(s)" in out
    assert out.index("run-000") < out.index("run-001") and "REGRESSION" in out and "60.00" in out
    assert cli.main(["--store", str(tmp_path), "trend", "--dataset", "other"]) == 1
    assert f"--dataset other: no trend of that identity; known: {IDENT}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_that_finds_its_trend_damaged_publishes_without_it(tmp_path, monkeypatch, prefect_harness,
                                                                 synthetic_archive, tiny, caplog):
    """A planted line in the trend does not cost the night: the run is published and
    promoted, says why the trend was left alone, and its report links no trend picture."""
    from flows.train_cifar import train_cifar
    from registry import champions

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    store = tmp_path / "store"
    ident = champions.identity({"dataset_name": "cifar10", "dataset_md5": md5, "split_seed": 0, "test_size": 140})
    planted = store / "trends" / f"{ident}.jsonl"
    planted.parent.mkdir(parents=True)
    planted.write_text('{"run_id": "x", "at": "2026-12-01T02:00:00+00:00", "status": "won"}\n')
    out = train_cifar(data_dir=str(path.parent), data_md5=md5, model=tiny, variants=["none"], epochs=1, subset=300,
                      store=str(store), device="cpu")
    manifest = json.loads(open(out["manifest"]).read())
    assert manifest["promoted"] and manifest["dataset"]["identity"] == ident
    assert "trend.png" not in manifest["artifacts"] and "trend.png" not in (store / "runs" / out["run_id"] /
                                                                           "report.md").read_text()
    assert planted.read_text().count("\n") == 1  # left as it was
    said = [r.getMessage() for r in caplog.records if "not updated" in r.getMessage()]
    assert any(m.startswith("the trend was not updated: ") and "expected 'status'" in m for m in said), said
