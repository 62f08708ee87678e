"""A run whose fingerprint equals the champion's run's trains nothing: through a real
Prefect server and process worker, running the local deployment.

The deployment is made from a copy of the product, which the worker runs (its pull step
and PYTHONPATH), so that a real source edit there reaches the next flow run: a changed
line trains naming `code`, a comment does not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from run import fingerprint
from store import open_store
from tests.prefect_fixtures import (EXTRAS, LOCAL_POOL, PREFECT, REPO, STARTUP_S, cli, client, eventually,
                                    notification_webhook, start_worker)

pytestmark = pytest.mark.slow

TINY = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "variants": ["none"], "epochs": 1,
        "subset": 100}
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of what the worker runs: the product packages and the deployment file."""
    root = tmp_path_factory.mktemp("tree")
    for name in (*fingerprint.PACKAGES, "deployments"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("constraints.txt", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    return root


@pytest.fixture(scope="module")
def worker(server, procs, tree, tmp_path_factory) -> dict:
    # the tree, then the suite's test-only models (tests/extras/)
    env = {**server, "PYTHONPATH": os.pathsep.join([str(tree), EXTRAS["PYTHONPATH"]])}
    cli(env, "work-pool", "create", LOCAL_POOL, "--type", "process")
    r = subprocess.run([PREFECT, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "train-cifar/local"],
                       env=env, cwd=tree, capture_output=True, text=True, timeout=STARTUP_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, log = start_worker(procs, env, LOCAL_POOL, "skip-local")
    return {**env, "worker_log": str(log), "store": str(tmp_path_factory.mktemp("store"))}


def run_local(env: dict, **params):
    """One flow run of train-cifar/local, created through the API as `prefect deployment
    run` does; its final state."""
    with client(env) as c:
        d = c.read_deployment_by_name("train-cifar/local")
        run = c.create_flow_run_from_deployment(d.id, parameters={**TINY, "store": env["store"], **params})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run := c.read_flow_run(run.id)).state.is_final():
            if time.monotonic() > deadline:
                raise AssertionError(f"{run.id} not final after {RUN_TIMEOUT_S}s: {run.state!r}\n"
                                     f"{Path(env['worker_log']).read_text()[-3000:]}")
            time.sleep(0.5)
        return run


def run_dir(env: dict, run) -> Path:
    found = list(Path(env["store"], "runs").glob(f"*-{str(run.id)[-8:]}"))
    assert len(found) == 1, found
    return found[0]


def manifest(env: dict, run) -> dict:
    return json.loads((run_dir(env, run) / "manifest.json").read_text())


def trained(env: dict, run) -> bool:
    return (run_dir(env, run) / "variants").is_dir()


def edit(path: Path, old: str, new: str) -> None:
    src = path.read_text()
    assert old in src, (path, old)
    path.write_text(src.replace(old, new, 1))


@pytest.fixture(scope="module")
def first(worker):
    run = run_local(worker)
    assert run.state.is_completed() and run.state.name == "Completed", run.state
    return run


def test_the_same_run_again_is_skipped_quickly_naming_the_champion(worker, first):
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, FlowRunFilterParentFlowRunId)
    from prefect.events.filters import EventFilter, EventNameFilter

    assert trained(worker, first)
    digest = manifest(worker, first)["fingerprint"]["digest"]

    again = run_local(worker)
    assert again.state.is_completed() and again.state.name == "Skipped", again.state
    assert manifest(worker, first)["run_id"] in again.state.message
    assert not trained(worker, again)  # no variants folder: nothing trained
    assert not (run_dir(worker, again) / "manifest.json").exists()
    record = json.loads((run_dir(worker, again) / "skipped.json").read_text())
    assert record["matched"]["run_id"] == manifest(worker, first)["run_id"] and record["digest"] == digest
    assert record["matched"]["created_at"] == manifest(worker, first)["created_at"]
    assert again.total_run_time < first.total_run_time

    with client(worker) as c:
        children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[again.id])))
        assert children == []
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.id])))
        assert not [t.name for t in tasks if t.name.startswith(("train-", "test-model", "publish-run"))]
        # the champion's run checked the same data the same way: not checked again
        assert not [t.name for t in tasks if t.name.startswith("check-data")], [t.name for t in tasks]
        artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[again.id])))
        page = next(a for a in artifacts if a.key == "skipped")
        assert record["matched"]["run_id"] in page.data and digest in page.data

    def events():
        with client(worker) as c:
            page = c.read_events(EventFilter(event=EventNameFilter(name=["train-cifar.skipped"])), limit=50)
            return [e for e in page.events if e.payload.get("run_id") == record["run_id"]]

    got = eventually(events, bool)
    assert got and got[0].payload["matched"]["run_id"] == record["matched"]["run_id"]

    # the skipped night is in the dataset's trend, after the champion's
    from registry import trends

    ident = manifest(worker, first)["dataset"]["identity"]
    _, entries = trends.read(open_store(worker["store"]), ident)
    statuses = {e["run_id"]: e["status"] for e in entries}
    assert statuses[manifest(worker, first)["run_id"]] == "trained" and statuses[record["run_id"]] == "skipped"


def test_a_comment_in_the_code_still_skips(worker, tree, first):
    edit(tree / "cnn" / "train.py", "\n", "\n# a comment, and a blank line: not a change\n\n")
    run = run_local(worker)
    assert run.state.name == "Skipped", run.state
    assert not trained(worker, run)


def test_force_trains_anyway_finding_nothing_changed(worker, first):
    run = run_local(worker, force=True)
    assert run.state.is_completed() and run.state.name == "Completed", run.state
    assert trained(worker, run)
    m = manifest(worker, run)
    assert m["changed_since_champion"] == {} and m["fingerprint_compared_with"] is not None


def test_a_changed_training_parameter_trains_naming_it(worker, first):
    run = run_local(worker, epochs=2)
    assert run.state.name == "Completed", run.state
    assert trained(worker, run)
    changed = manifest(worker, run)["changed_since_champion"]
    assert changed["params"]["now"]["epochs"] == 2 and "code" not in changed
    assert "params" in (run_dir(worker, run) / "report.md").read_text()


def test_a_changed_source_line_trains_naming_code(worker, tree, first):
    edit(tree / "run" / "report.py", "DPI = 80", "DPI = 81")
    run = run_local(worker)
    assert run.state.name == "Completed", run.state
    assert trained(worker, run)
    m = manifest(worker, run)
    assert "code" in m["changed_since_champion"]
    assert m["fingerprint"]["parts"]["code"] == fingerprint.code_digest(tree) != fingerprint.code_digest(REPO)



# ---------------------------------------------------------------- night over night: the regression alert

# bigger than TINY: 210 test images, and a champion well above chance, so that a model
# made much worse on purpose is worse beyond noise. `tiny` (tests/extras/) in 4 epochs gets
# 72% of them right (lr=1e-6: 62 points behind, 95% interval -69 to -55), at a seventh of
# the training CPU of the seed network in 2 epochs (about 38%); tiny in 2 epochs: 18%
BIGGER = {"synthetic_train": 1000, "synthetic_test": 600, "epochs": 4, "subset": None, "model": "tiny"}


def _dir(store: str, run) -> Path:
    [found] = Path(store, "runs").glob(f"*-{str(run.id)[-8:]}")
    return found


@pytest.fixture(scope="module")
def nights(worker, tmp_path_factory):
    """Three nights in a store of their own, the regression automation listening: a
    champion; a model with a learning rate far too small; the champion's run again (force)."""
    store = str(tmp_path_factory.mktemp("nights"))
    with notification_webhook(worker) as received:
        champion = run_local(worker, **BIGGER, store=store)
        worse = run_local(worker, **BIGGER, store=store, lr=1e-6)
        same = run_local(worker, **BIGGER, store=store, force=True)
        for run in (champion, worse, same):
            assert run.state.name == "Completed", run.state
        ids = {name: json.loads((_dir(store, run) / "manifest.json").read_text())
               for name, run in (("champion", champion), ("worse", worse), ("same", same))}
        notes = eventually(lambda: [n for n in received if "regression" in n["subject"]], bool, timeout=90)
        yield {"store": store, "manifests": ids, "notes": notes, "received": received}


def _regression_events(env: dict) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter

    with client(env) as c:
        return c.read_events(EventFilter(event=EventNameFilter(name=["train-cifar.regression"])), limit=50).events


def test_a_clearly_worse_model_raises_a_regression_naming_what_changed(worker, nights):
    from registry import champions

    champion, worse = nights["manifests"]["champion"], nights["manifests"]["worse"]
    r = worse["regression"]
    assert not worse["promoted"] and r is not None, worse["test"].get("champion_comparison")
    assert r["champion_run_id"] == champion["run_id"] and r["ci"][1] < 0
    assert r["changed"] == ["params.lr 0.05 -> 1e-06"], r
    assert r["sentence"] in Path(nights["store"], "runs", worse["run_id"], "report.md").read_text()
    # the champion stays
    store = open_store(nights["store"])
    assert champions.read(store, champion["dataset"]["identity"])["run_id"] == champion["run_id"]

    # the event, read back from the server, with the numbers and what changed
    events = [e for e in eventually(lambda: _regression_events(worker), bool)
              if e.payload["run_id"] == worse["run_id"]]
    assert len(events) == 1, events
    payload = events[0].payload
    assert payload["champion_run_id"] == champion["run_id"] and payload["difference"] == r["difference"]
    assert payload["changed_since_champion"]["params"] == {"champion": {"lr": 0.05}, "now": {"lr": 1e-6}}
    assert payload["dataset_identity"] == champion["dataset"]["identity"]

    # the automation is on the server and turned the event into a notification
    with client(worker) as c:
        [automation] = c.read_automations_by_name("train-cifar regression")
    assert automation.trigger.expect == {"train-cifar.regression"} and automation.enabled
    [note] = nights["notes"]
    assert worse["run_id"] in note["subject"]
    assert "params.lr 0.05 -> 1e-06" in note["body"] and champion["run_id"] in note["body"]


def test_a_model_no_worse_within_noise_raises_nothing(worker, nights):
    same = nights["manifests"]["same"]
    assert same["regression"] is None and not same["promoted"]
    assert same["test"]["champion_comparison"]["ci"][1] >= 0
    time.sleep(5)  # the worse run's event and note are in; the later run's would be too
    assert not [e for e in _regression_events(worker) if e.payload["run_id"] == same["run_id"]]
    assert len([n for n in nights["received"] if "regression" in n["subject"]]) == 1


def test_the_trend_holds_every_night_and_shows_in_the_ui(worker, nights):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from registry import trends
    from tasks.trend import artifact_key

    m = nights["manifests"]
    ident = m["champion"]["dataset"]["identity"]
    _, entries = trends.read(open_store(nights["store"]), ident)
    assert [(e["run_id"], e["status"], e["promoted"], e["regression"]) for e in entries] == [
        (m["champion"]["run_id"], "trained", True, False), (m["worse"]["run_id"], "trained", False, True),
        (m["same"]["run_id"], "trained", False, False)]
    assert all(e["champion"]["run_id"] == m["champion"]["run_id"] for e in entries)
    assert entries[1]["test"]["accuracy"] == m["worse"]["test"]["accuracy"]
    assert "trend.png" in m["same"]["artifacts"]
    # the table artifact: one key per identity, its latest version has every night, newest first
    with client(worker) as c:
        [latest] = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[artifact_key(ident)])))
    rows = json.loads(latest.data)
    assert [r["run"] for r in rows] == [m["same"]["run_id"], m["worse"]["run_id"], m["champion"]["run_id"]]
    assert rows[1]["regression"] == "REGRESSION"
