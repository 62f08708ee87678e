"""One run per missed night (late_runs): the decision on lists of runs, the run id of runs
created together, and missed nights through a real Prefect server and process worker.

The server's backfill endpoint (`POST /deployments/{id}/schedule` with times in the past,
what the scheduler does for a deployment) creates three auto-scheduled nights of
train-cifar/local while no worker polls its pool: what a worker finds after a weekend's
outage. Then a worker starts and runs them all at once.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tests.prefect_fixtures import LOCAL_POOL, cli, client, eventually, settled, start_worker

# A night that waits for the deployment's concurrency slot (ENQUEUE) asks again after 3 s, not 30
SERVER_SETTINGS = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3"}
NIGHT = datetime(2026, 12, 4, 2, 0, tzinfo=timezone.utc)
NOW = NIGHT + timedelta(days=2, hours=10)


def _run(night: datetime, state: str = "SCHEDULED", auto: bool = True, deployment=None, name: str | None = None):
    from prefect.client.schemas.objects import FlowRun, StateType

    return FlowRun(id=uuid.uuid4(), name=name or f"night-{night:%d}", flow_id=uuid.UUID(int=1),
                   deployment_id=deployment or uuid.UUID(int=2), auto_scheduled=auto,
                   expected_start_time=night, state_type=StateType(state))


# ---------------------------------------------------------------- the decision


def test_a_due_newer_night_supersedes_whatever_its_state_unless_it_will_not_train():
    from run.nightly import newest_due

    me = _run(NIGHT, "RUNNING")
    for state in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "COMPLETED"):
        newer = _run(NIGHT + timedelta(days=1), state)
        assert newest_due(me, [me, newer], NOW) is newer, state
    # cancelled (by someone, or by a concurrency limit's CANCEL_NEW), failed or crashed: no model
    for state in ("CANCELLED", "CANCELLING", "FAILED", "CRASHED"):
        assert newest_due(me, [me, _run(NIGHT + timedelta(days=1), state)], NOW) is None, state


def test_the_newest_of_several_due_nights_is_named():
    from run.nightly import newest_due

    a, b, c = (_run(NIGHT + timedelta(days=d)) for d in range(3))
    assert newest_due(a, [a, b, c], NOW) is c
    assert newest_due(b, [a, b, c], NOW) is c
    assert newest_due(c, [a, b, c], NOW) is None  # the newest trains


def test_only_due_auto_scheduled_runs_of_the_same_deployment_count():
    from run.nightly import newest_due

    me = _run(NIGHT)
    tomorrow = _run(NOW + timedelta(hours=1))  # created ahead by the scheduler, not due
    by_hand = _run(NIGHT + timedelta(days=1), auto=False)
    elsewhere = _run(NIGHT + timedelta(days=1), deployment=uuid.UUID(int=3))
    older = _run(NIGHT - timedelta(days=1))
    same_night = _run(NIGHT)
    assert newest_due(me, [me, tomorrow, by_hand, elsewhere, older, same_night], NOW) is None
    # a run started by hand is never stale
    manual = _run(NIGHT, auto=False)
    assert newest_due(manual, [manual, _run(NIGHT + timedelta(days=1))], NOW) is None


def test_the_message_names_the_newer_run():
    from run.nightly import superseded_message

    me, newer = _run(NIGHT), _run(NIGHT + timedelta(days=2), "RUNNING", name="brave-otter")
    msg = superseded_message(me, newer)
    assert "brave-otter" in msg and str(newer.id) in msg
    assert "2026-12-04 02:00 UTC" in msg and "2026-12-06 02:00 UTC" in msg and "late_runs=all" in msg


def test_a_deployment_name_prefect_allows_makes_a_claim_key():
    """Prefect allows spaces and dots in deployment names (not '/', '%', '&', '<', '>');
    a night's claim of such a deployment has a folder of its own."""
    from run.layout import night_key

    digest = "a" * 64
    keys = {name: night_key(name, "2026-12-07", digest) for name in ("nightly", "nightly run", "nightly-run", "v1.2")}
    assert keys["nightly"] == f"nights/nightly/2026-12-07/{digest}.json"  # a safe name stays as it was
    assert len(set(keys.values())) == 4 and all(" " not in k and ".." not in k for k in keys.values()), keys


def test_runs_created_in_the_same_millisecond_get_different_run_ids():
    """Prefect's flow run ids are UUIDv7: the first 12 hex digits are the millisecond."""
    from prefect._internal.uuid7 import uuid7

    from flows.train_cifar import run_id_of

    ids = [uuid7() for _ in range(2000)]
    by_ms: dict[str, list] = {}
    for i in ids:
        by_ms.setdefault(str(i)[:13], []).append(i)
    a, b = next(same for same in by_ms.values() if len(same) > 1)[:2]
    assert str(a)[:8] == str(b)[:8]  # what the run id used to take
    created = datetime(2026, 12, 6, 19, 0, 0, tzinfo=timezone.utc)
    assert run_id_of(created, a) != run_id_of(created, b)
    assert run_id_of(created, a) == f"20261206-190000-{str(a)[-8:]}"


# ---------------------------------------------------------------- missed nights, end to end

TINY = {"dataset": "synthetic", "synthetic_train": 200, "synthetic_test": 100, "variants": ["none"],
        "epochs": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def local_deployment(server) -> dict:
    """train-cifar/local, deployed with `make deploy`'s command; no worker yet."""
    cli(server, "work-pool", "create", LOCAL_POOL, "--type", "process")
    cli(server, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "train-cifar/local")
    return server


def copy_of_local(env: dict, name: str, **options) -> str:
    """train-cifar/local again as train-cifar/<name> (its own runs, its own nights), with `options`."""
    with client(env) as c:
        d = c.read_deployment_by_name("train-cifar/local")
        c.create_deployment(flow_id=d.flow_id, name=name, entrypoint=d.entrypoint, work_pool_name=LOCAL_POOL,
                            pull_steps=d.pull_steps, parameters=d.parameters,
                            parameter_openapi_schema=d.parameter_openapi_schema, enforce_parameter_schema=True,
                            **options)
    return f"train-cifar/{name}"


def missed_nights(env: dict, store: Path, late_runs: str, deployment: str, schedules: int = 1, **params) -> list:
    """Three nights of `deployment` backfilled into the past, as the scheduler creates them:
    auto-scheduled, Scheduled, then Late; with `schedules` identical schedules, that many runs
    a night. Returns them oldest first.

    The nights fall at the hour opposite the clock's, so neither the last night nor the next
    one the scheduler creates ahead (which becomes due when its hour passes) lies within hours
    of the test. Each test has a deployment of its own: another test's newer nights would
    otherwise supersede this one's."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    now = datetime.now(timezone.utc)
    hour = (now.hour + 12) % 24
    with client(env) as c:
        d = c.read_deployment_by_name(deployment)
        c.create_deployment_schedules(d.id, [DeploymentScheduleCreate(
            schedule=CronSchedule(cron=f"0 {hour} * * *", timezone="UTC"), active=True,
            parameters={**TINY, "store": str(store), "late_runs": late_runs, **params})] * schedules)
        r = c.request("POST", "/deployments/{id}/schedule", path_params={"id": d.id},
                      json={"start_time": (now - timedelta(days=3)).isoformat(), "end_time": now.isoformat()})
        r.raise_for_status()
        runs = [f for f in c.read_flow_runs() if f.deployment_id == d.id and f.auto_scheduled
                and f.expected_start_time <= now and f.parameters.get("store") == str(store)]
    runs.sort(key=lambda f: f.expected_start_time)
    assert len(runs) == 3 * schedules and all(f.state_type.value == "SCHEDULED" for f in runs), runs
    return runs


def run_with_worker(procs, env: dict, name: str, runs: list, timeout: float = 360) -> list:
    """Starts a worker on the local pool, waits for `runs` to end, stops the worker; returns them read again."""
    proc, log = start_worker(procs, env, LOCAL_POOL, name)
    try:
        def read():
            with client(env) as c:
                return [c.read_flow_run(f.id) for f in runs]
        final = eventually(read, lambda fs: all(f.state is not None and f.state.is_final() for f in fs),
                           timeout=timeout, every=2)
        settled([f.id for f in runs])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=180)  # a bound: a worker on a busy machine may take a minute to stop
    assert all(f.state.is_final() for f in final), (
        f"{[(f.name, f.state.name) for f in final]}; worker log:\n{log.read_text()[-4000:]}")
    return final


def stored_runs(store: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((store / "runs").iterdir())} if (store / "runs").is_dir() else {}


@pytest.mark.slow
def test_only_the_newest_missed_night_trains(local_deployment, procs, tmp_path):
    store = tmp_path / "store"
    runs = missed_nights(local_deployment, store, "latest", copy_of_local(local_deployment, "late-latest"))
    old, older_still, newest = runs[1], runs[0], runs[2]
    final = run_with_worker(procs, local_deployment, "late-latest", runs)
    by_id = {f.id: f for f in final}
    done = by_id[newest.id]
    assert done.state.is_completed(), (done.state.name, done.state.message)
    for stale in (by_id[older_still.id], by_id[old.id]):
        assert stale.state.is_cancelled() and stale.state.name == "Superseded", (stale.state.name, stale.state.message)
        assert done.name in stale.state.message and str(done.id) in stale.state.message, stale.state.message
    # the stale nights touched nothing: one run in the store, the newest's, with its manifest
    stored = stored_runs(store)
    assert len(stored) == 1, stored
    [(run_id, path)] = stored.items()
    assert run_id.endswith(str(done.id)[-8:]) and (path / "manifest.json").is_file()
    # the dataset's trend has every night: the stale ones (their entries left for the next
    # run of the deployment, which was the newest night) and the one that trained
    from registry import trends
    from store import open_store

    identity = json.loads((path / "manifest.json").read_text())["dataset"]["identity"]
    _, entries = trends.read(open_store(str(store)), identity)
    assert [(e["flow_run_id"], e["status"]) for e in entries] == [
        (str(older_still.id), "superseded"), (str(old.id), "superseded"), (str(done.id), "trained")], entries
    assert all(e["night"] == f"{f.expected_start_time:%Y-%m-%d}" for e, f in zip(entries, (older_still, old, done)))
    assert done.name in entries[0]["message"]


@pytest.mark.slow
def test_late_runs_all_trains_every_missed_night(local_deployment, procs, tmp_path):
    store = tmp_path / "store"
    # force: every night trains even though nothing changed between them (else the
    # nights after the first champion could skip, as a week of unchanged nights should)
    runs = missed_nights(local_deployment, store, "all", copy_of_local(local_deployment, "late-all"), force=True)
    created = {f.created.replace(microsecond=0) for f in runs}
    final = run_with_worker(procs, local_deployment, "late-all", runs)
    assert all(f.state.is_completed() for f in final), [(f.name, f.state.name, f.state.message) for f in final]
    # three runs in the store, one each, though the backfill created them together
    stored = stored_runs(store)
    assert len(stored) == 3 and all((p / "manifest.json").is_file() for p in stored.values()), stored
    assert {i[-8:] for i in stored} == {str(f.id)[-8:] for f in final}
    print(f"created at {sorted(created)}; run ids {sorted(stored)}")


@pytest.mark.slow
def test_two_runs_of_one_night_with_one_fingerprint_train_once(local_deployment, procs, tmp_path):
    """Two identical schedules (a schedule added twice): two runs a night. The older nights
    are Superseded; of the newest night's two, one claims the night and trains, the other
    ends Skipped naming it (the night's claim, or the champion it has become by then)."""
    store = tmp_path / "store"
    runs = missed_nights(local_deployment, store, "latest", copy_of_local(local_deployment, "late-twice"), schedules=2)
    final = run_with_worker(procs, local_deployment, "late-twice", runs)
    states = [(f.name, f.state.name, f.state.message) for f in final]
    newest_night = max(f.expected_start_time for f in final)
    tonight = [f for f in final if f.expected_start_time == newest_night]
    assert len(tonight) == 2, states
    assert all(f.state.name == "Superseded" for f in final if f not in tonight), states
    [trained] = [f for f in tonight if f.state.name == "Completed"]
    [skipped] = [f for f in tonight if f.state.name == "Skipped"]
    stored = stored_runs(store)
    assert set(stored) == {next(i for i in stored if i.endswith(str(trained.id)[-8:])),
                           next(i for i in stored if i.endswith(str(skipped.id)[-8:]))}, stored
    trained_dir, skipped_dir = (next(p for i, p in stored.items() if i.endswith(str(f.id)[-8:]))
                                for f in (trained, skipped))
    assert (trained_dir / "manifest.json").is_file()
    record = json.loads((skipped_dir / "skipped.json").read_text())
    assert record["matched"]["run_id"] == trained_dir.name, record
    assert not (skipped_dir / "variants").exists() and not (skipped_dir / "manifest.json").exists()
    assert trained_dir.name in skipped.state.message, skipped.state.message
    claims = list((store / "nights" / "late-twice").glob("*/*.json"))
    assert len(claims) == 1 and json.loads(claims[0].read_text())["run_id"] == trained_dir.name, claims


# ---------------------------------------------------------------- with a deployment concurrency limit


def limited_copy(env: dict, strategy: str) -> str:
    """train-cifar/local again as train-cifar/limited-<strategy>, with train-cifar/nightly's
    concurrency limit (one run at a time) and the collision strategy `strategy`."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

    return copy_of_local(env, f"limited-{strategy.lower().replace('_', '-')}", concurrency_limit=1,
                         concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy(strategy)))


def nightly_collision_strategy() -> str:
    spec = yaml.safe_load((Path(__file__).parents[1] / "deployments" / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["concurrency_limit"]["limit"] == 1
    return nightly["concurrency_limit"]["collision_strategy"]


@pytest.mark.slow
def test_under_the_nightlys_concurrency_limit_the_stale_nights_are_superseded_and_the_newest_trains(
        local_deployment, procs, tmp_path):
    """train-cifar/nightly's limit as prefect.yaml sets it (ENQUEUE): the newer nights wait for
    the slot (AwaitingConcurrencySlot, Scheduled), so they count, and each older night that gets
    the slot ends Superseded in seconds. (Under CANCEL_NEW the server cancelled the newer nights
    before they ran any code, so whichever night got the slot trained: README, Missed nights.)"""
    store = tmp_path / "store"
    runs = missed_nights(local_deployment, store, "latest", limited_copy(local_deployment, nightly_collision_strategy()))
    final = run_with_worker(procs, local_deployment, "late-enqueue", runs)
    states = [(f.name, f.state.name, f.state.message) for f in final]
    print(f"oldest first: {states}")
    *stale, newest = final
    assert newest.state.is_completed(), states
    assert all(f.state.name == "Superseded" and str(newest.id) in f.state.message for f in stale), states
    assert len(stored_runs(store)) == 1
