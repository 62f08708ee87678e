"""A killed run retried at once, as a person does it: on a real `prefect server` and
the project's process worker, with the real `prefect flow-run retry`.

A process worker watches the flow-run process it started. When that process is
killed, the run is reported Crashed at once; the worker then finishes with the dead
process and, up to half a minute later, would report the same crash again. A retry
issued as soon as the run shows Crashed must not be hit by that late report: the
retried run ends Completed, continuing the same run from its checkpoint.
"""
from __future__ import annotations

import json
import re
import signal
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tests.prefect_fixtures import (EXTRAS, LOCAL_POOL, PREFECT_FILE, REPO, cli, client, kill, run_processes, settled,
                                    start_worker)

pytestmark = pytest.mark.slow

# `paced` (tests/extras/sitecustomize.py): a few seconds an epoch, long enough to be killed
# mid-training, at little CPU
PARAMS = ["dataset=synthetic", "synthetic_train=1000", "synthetic_test=400", "subset=800", "epochs=5", "patience=5",
          'variants=["flip"]', "model=paced"]


@pytest.fixture(scope="module")
def worker(server, procs, tmp_path_factory) -> dict:
    """The local pool and train-cifar/local, as `make deploy` makes them, and one worker
    started as `make worker` starts it."""
    env = {**server, **EXTRAS, "OMP_NUM_THREADS": "1"}
    cli(env, "work-pool", "create", LOCAL_POOL, "--type", "process")
    cli(env, "deploy", "--prefect-file", str(PREFECT_FILE.relative_to(REPO)), "--name", "train-cifar/local")
    _, log = start_worker(procs, env, LOCAL_POOL, "local")
    return {**env, "worker_log": str(log), "store": str(tmp_path_factory.mktemp("store"))}


def wait_for(what: str, check, timeout: float, env: dict, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{Path(env['worker_log']).read_text()[-4000:]}")


def flow_run(env: dict, run_id: uuid.UUID):
    with client(env) as c:
        return c.read_flow_run(run_id)


def logged(env: dict, run_id: uuid.UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with client(env) as c:
        return [log.message for log in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                                   sort=LogSort.TIMESTAMP_ASC)]


def _current_history(store: Path) -> Path | None:
    """The flip unit's current history.csv, as its lease names it (files go up under gen-<g>/)."""
    from store import LocalStore
    from store.lease import committed

    lease = next(store.glob("runs/*/variants/flip/lease.json"), None)
    if lease is None:
        return None
    current = committed(LocalStore(store), str(lease.relative_to(store)))
    key = ((current or {}).get("files") or {}).get("history.csv", {}).get("key")
    return store / key if key else None


def test_a_run_killed_and_retried_at_once_completes_from_its_checkpoint(worker):
    store = Path(worker["store"])
    out = cli(worker, "deployment", "run", "train-cifar/local", *[a for p in PARAMS for a in ("-p", p)],
              "-p", f"store={store}").stdout
    run = uuid.UUID(re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1))
    history = lambda: _current_history(store)  # noqa: E731
    wait_for("two epochs in the store", lambda: (h := history()) and len(pd.read_csv(h)) >= 2, 300, worker)
    run_id = next((store / "runs").iterdir()).name

    kill(run_processes(run), signal.SIGKILL)
    wait_for("the run to show Crashed", lambda: flow_run(worker, run).state.is_crashed(), 60, worker, every=0.2)
    cli(worker, "flow-run", "retry", str(run))  # at once, as a person who sees Crashed does

    done = wait_for("the retried run to finish", lambda: (r := flow_run(worker, run)).state.is_final() and r, 420,
                    worker, every=2)
    assert done.state.is_completed(), f"{done.state!r}\n{Path(worker['worker_log']).read_text()[-4000:]}"
    assert done.run_count == 2
    # the same run continued: one run folder, its manifest written by this flow run
    assert [p.name for p in (store / "runs").iterdir()] == [run_id]
    manifest = json.loads((store / "runs" / run_id / "manifest.json").read_text())
    assert manifest["flow_run_id"] == str(run) and [v["name"] for v in manifest["variants"]] == ["flip"]
    assert list(pd.read_csv(history())["epoch"]) == [1, 2, 3, 4, 5]  # each epoch once
    # the retry resumed from the checkpoint, not from epoch 1
    settled([run])  # its last log lines are sent as its process exits
    messages = logged(worker, run)
    resumed = [m for m in messages if m.startswith("flip: resuming from ")]
    assert len(resumed) == 1, messages[-30:]
    after = messages[messages.index(resumed[0]):]
    assert [int(m.group(1)) for msg in after if (m := re.match(r"flip epoch (\d+)/", msg))][0] >= 3, after
