"""Variants across machines, with the faults of a spot GPU fleet, on real parts.

A real `prefect server`, moto's S3 server on loopback, a process worker for the
parent (train-cifar/local) and two process workers with `--limit 1` on the variant
pool: two "GPU nodes", each with its own TRAIN_CIFAR_CACHE. The variant deployment
gives its runs what a Kubernetes pod gets (`prefect flow-run execute`, SIGTERM set
to reschedule), so the same code paths run as on the cluster; the zombie automation
(deployments/crash-zombie-runs.yaml) marks a run whose heartbeats stop Crashed.

Every fault is made real (SIGTERM, SIGKILL of processes, `prefect flow-run retry`)
and judged by what is in the bucket and in Prefect afterwards.
"""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from store import open_store
from run.layout import Unit, stored_key
from tests.prefect_fixtures import (EXTRAS, LOCAL_POOL, REPO, VARIANT_POOL, Processes, cli, client, create_pools,
                                    deploy_all, descendants, kill, run_processes, settled, start_worker, top_process)
from tests.s3_fixtures import aws_client, aws_env

pytestmark = pytest.mark.slow

NODES = ("gpu-node-a", "gpu-node-b")
HEARTBEAT_S, ZOMBIE_AFTER_S = 30, 45  # Prefect's smallest heartbeat; three quarters of a minute without one
SYNTHETIC = ["dataset=synthetic", "synthetic_train=1000", "synthetic_test=400", "subset=800"]
# for runs whose trainings nothing kills or races: the seed network at small widths, about
# a thirteenth of its CPU a step
TINY = [*SYNTHETIC, "model=tiny"]
# for runs killed or raced mid-training: epochs as long as the seed network's (several
# seconds) at tiny's CPU (tests/extras/sitecustomize.py)
PACED = [*SYNTHETIC, "model=paced"]


class Cluster:
    def __init__(self, procs: Processes, env: dict, tmp: Path):
        self.procs, self.env, self.tmp = procs, env, tmp
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def cache(self, name: str) -> Path:
        return self.tmp / f"cache-{name}"

    def start(self, name: str, pool: str, *extra: str) -> None:
        env = {**self.env, "TRAIN_CIFAR_CACHE": str(self.cache(name))}
        self.workers[name], self.logs[name] = start_worker(self.procs, env, pool, name, *extra)

    def ensure_nodes(self) -> None:
        """Both variant workers up (a test may have killed one, as a lost node)."""
        for name in NODES:
            if name not in self.workers or self.workers[name].poll() is not None:
                self.start(name, VARIANT_POOL, "--limit", "1")

    def tail(self) -> str:
        return "\n".join(f"--- {n}:\n{p.read_text()[-2500:]}" for n, p in self.logs.items())


@pytest.fixture(scope="module")
def cluster(server, procs, s3_server, tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("fanout")
    create_pools(server)
    deploy_all({**server, **EXTRAS}, tmp)
    # one thread per training process: three or four of them share two cores here, as
    # pods each have their own GPU (and it keeps the runs' arithmetic the same)
    env = {**server, **aws_env(), **EXTRAS, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "deployments/add_automations.py", "--zombie-after", str(ZOMBIE_AFTER_S)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    c = Cluster(procs, env, tmp)
    c.start("parent", LOCAL_POOL)
    c.ensure_nodes()
    return c


@pytest.fixture
def bucket(cluster, s3_server) -> str:
    s3_server.ensure_running()
    name = f"fanout-{uuid.uuid4().hex[:10]}"
    aws_client("s3").create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------- helpers


def start_run(env: dict, *params: str) -> uuid.UUID:
    """`prefect deployment run train-cifar/local -p ...` (no --watch); the flow run's id."""
    args = ["deployment", "run", "train-cifar/local"]
    for p in params:
        args += ["-p", p]
    out = cli(env, *args).stdout
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    return uuid.UUID(m.group(1))


def fanout(bucket: str, *variants: str) -> list[str]:
    return [f"store=s3://{bucket}/store", "variant_deployment=train-variant/local",
            f"variants={json.dumps(list(variants))}"]


def wait_for(what: str, check, timeout: float, cluster: Cluster, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{cluster.tail()}")


def flow_run(env: dict, run_id: uuid.UUID):
    with client(env) as c:
        return c.read_flow_run(run_id)


# a bound, not a timing: a suite on 2 cores that is busy elsewhere once took 7 minutes for a run of 3 children
def wait_final(cluster: Cluster, run_id: uuid.UUID, timeout: float = 900):
    return wait_for(f"flow run {run_id} to finish", lambda: (lambda r: r if r.state.is_final() else None)(
        flow_run(cluster.env, run_id)), timeout, cluster, every=2)


def children(env: dict, parent: uuid.UUID) -> dict[str, object]:
    """The parent's child flow runs (nested under it through their stand-in task runs), by name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with client(env) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    return {r.name: r for r in runs}


def history(bucket: str, run_id: str, variant: str) -> pd.DataFrame | None:
    try:
        # where the unit's lease names its current history
        key = stored_key(open_store(f"s3://{bucket}/store"), run_id, Unit(variant, 0), "history.csv")
        body = aws_client("s3").get_object(Bucket=bucket, Key=f"store/{key}")
    except Exception:  # noqa: BLE001 - not there yet
        return None
    return pd.read_csv(io.BytesIO(body["Body"].read()))


def manifest(bucket: str, run_id: str) -> dict:
    body = aws_client("s3").get_object(Bucket=bucket, Key=f"store/runs/{run_id}/manifest.json")["Body"].read()
    return json.loads(body)


def epochs_logged(env: dict, flow_run_ids: list, variant: str, after_resume: bool = False) -> list[int]:
    """Every 'epoch N/M' line these flow runs logged for `variant`, in order (an epoch
    trained twice shows up twice); with `after_resume`, only those after the last
    'resuming from' line. A killed process's last lines may never reach the server
    (logs go in batches), so what was logged before a kill is a lower bound."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    settled(flow_run_ids)  # a run that ended sends its last lines as its process exits
    with client(env) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))), sort=LogSort.TIMESTAMP_ASC)
    messages = [log.message for log in logs]
    if after_resume:
        starts = [i for i, m in enumerate(messages) if m.startswith(f"{variant}: resuming from ")]
        assert starts, f"{variant} never resumed: {messages[-20:]}"
        messages = messages[starts[-1]:]
    return [int(m.group(1)) for msg in messages if (m := re.match(rf"{variant} epoch (\d+)/", msg))]


def kill_and_wait(cluster: Cluster, run_id: uuid.UUID) -> None:
    """SIGKILL the run's processes and wait only until it shows Crashed, as a person who
    then clicks Retry does (the project's worker reports the crash once: tests/test_retry.py)."""
    kill(run_processes(run_id), signal.SIGKILL)
    wait_for("the run to be marked Crashed", lambda: flow_run(cluster.env, run_id).state.is_crashed(), 60, cluster,
             every=0.2)


def run_id_of(kids: dict, variants: list[str]) -> str:
    """The run id in the children's names, `<run-id>-<variant>-a<attempt>`."""
    for name in kids:
        for v in variants:
            if m := re.fullmatch(rf"(.+)-{re.escape(v)}-a\d+", name):
                return m.group(1)
    raise AssertionError(f"no child named <run-id>-<variant>-a<n> among {sorted(kids)}")


def one_child_two_epochs_in(cluster: Cluster, bucket: str) -> tuple[uuid.UUID, object, str]:
    """A fanned-out run of one variant (6 epochs), once its child has two epochs in the
    store: (parent flow run id, the child flow run, the run id)."""
    cluster.ensure_nodes()
    parent = start_run(cluster.env, *PACED, "epochs=6", "patience=6", *fanout(bucket, "flip"))
    kid = wait_for("the child to start", lambda: next(iter(children(cluster.env, parent).values()), None),
                   120, cluster)
    run_id = run_id_of({kid.name: kid}, ["flip"])
    wait_for("two epochs in the store", lambda: (h := history(bucket, run_id, "flip")) is not None and len(h) >= 2,
             240, cluster)
    return parent, kid, run_id


# ---------------------------------------------------------------- the tests


def test_a_relative_store_with_fan_out_is_refused_before_any_work(cluster):
    run = start_run(cluster.env, *SYNTHETIC, "store=./artifacts", "variant_deployment=train-variant/local")
    run = wait_final(cluster, run, timeout=120)
    assert run.state.is_failed(), run.state
    assert "store './artifacts' with variant_deployment 'train-variant/local'" in run.state.message
    assert children(cluster.env, run.id) == {}


def test_fan_out_trains_each_variant_as_its_own_flow_run(cluster, bucket):
    variants = ["none", "flip", "flip-crop"]
    common = [*TINY, "epochs=3", "patience=3"]
    parent = start_run(cluster.env, *common, *fanout(bucket, *variants))
    local = start_run(cluster.env, *common, f"store=s3://{bucket}/in-process", f"variants={json.dumps(variants)}")
    parent, local = wait_final(cluster, parent), wait_final(cluster, local)
    assert parent.state.is_completed(), f"{parent.state!r}\n{cluster.tail()}"
    assert local.state.is_completed(), f"{local.state!r}\n{cluster.tail()}"

    kids = children(cluster.env, parent.id)
    run_id = run_id_of(kids, variants)
    assert sorted(kids) == sorted(f"{run_id}-{v}-a1" for v in variants)  # one flow run each, named for it
    assert all(k.state.is_completed() and k.run_count == 1 for k in kids.values())
    # each child's parent is the run: its stand-in task run belongs to the parent flow run
    with client(cluster.env) as c:
        assert {c.read_task_run(k.parent_task_run_id).flow_run_id for k in kids.values()} == {parent.id}
    # both "GPU nodes" trained (the worker that ran a flow run labels it), at the same time
    assert {k.labels["prefect.worker.name"] for k in kids.values()} == set(NODES)
    spans = sorted((k.start_time, k.end_time) for k in kids.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    # the UI: every variant in the run's table from the start (pending), attempts in the
    # last version, and each child with a progress artifact of its own
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    def artifacts(run, key=None):
        f = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run]),
                           key=ArtifactFilterKey(any_=[key]) if key else None)
        return c.read_artifacts(artifact_filter=f, sort=ArtifactSort.CREATED_DESC)

    with client(cluster.env) as c:
        tables = [json.loads(a.data) if isinstance(a.data, str) else a.data
                  for a in artifacts(parent.id, "variant-comparison")]
        progress = {k.name: [a.key for a in artifacts(k.id)] for k in kids.values()}
    assert [(r["variant"], r["status"]) for r in tables[-1]] == [(v, "pending") for v in variants]  # the first
    assert [(r["variant"], r["attempts"]) for r in tables[0]] == [(v, 1) for v in variants]  # the last
    assert all(f"progress-{v}" in progress[f"{run_id}-{v}-a1"] for v in variants), progress

    # the manifest is complete, and selection is what the in-process path chose on the same seeds
    m = manifest(bucket, run_id)
    assert m["flow_run_id"] == str(parent.id) and m["variant_deployment"] == "train-variant/local"
    assert [v["name"] for v in m["variants"]] == variants
    assert all(v["status"] in ("completed", "early_stopped") and v["attempts"] == 1 for v in m["variants"])
    for v in variants:
        assert {f"{v}/history.csv", f"{v}/best.safetensors"} <= set(m["artifacts"])
    s3 = aws_client("s3")
    for name, art in m["artifacts"].items():
        key = art["uri"].removeprefix(f"s3://{bucket}/")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == art["bytes"], name
    local_run = json.loads(s3.get_object(Bucket=bucket, Key=next(
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="in-process/runs/")["Contents"]
        if o["Key"].endswith("/manifest.json")))["Body"].read())
    assert m["selected"] == local_run["selected"]
    for ours, theirs in zip(m["variants"], local_run["variants"]):
        assert ours["best_epoch"] == theirs["best_epoch"]
        assert ours["val_accuracy"] == pytest.approx(theirs["val_accuracy"], abs=1e-6)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)


def test_fan_out_with_repeats_runs_a_child_per_seed_and_combines_them(cluster, bucket):
    """repeats=2: every (variant, seed) is its own child, named for its seed; the parent
    combines each variant's repeats into a mean and interval, as the in-process path does."""
    cluster.ensure_nodes()
    variants = ["none", "flip"]
    parent = wait_final(cluster, start_run(cluster.env, *TINY, "epochs=2", "patience=2", "repeats=2", "seed=3",
                                           *fanout(bucket, *variants)))
    assert parent.state.is_completed(), f"{parent.state!r}\n{cluster.tail()}"
    kids = children(cluster.env, parent.id)
    run_id = next(m.group(1) for name in kids if (m := re.fullmatch(r"(.+)-none-s3-a1", name)))
    assert sorted(kids) == sorted(f"{run_id}-{v}-s{s}-a1" for v in variants for s in (3, 4))
    assert all(k.state.is_completed() and k.run_count == 1 for k in kids.values())
    assert {k.parameters["seed"] for k in kids.values()} == {3, 4}

    s3 = aws_client("s3")
    for v in variants:
        for s in (3, 4):
            for f in ("metrics.json", "history.csv", "best.safetensors", "val_predictions.safetensors"):
                key = stored_key(open_store(f"s3://{bucket}/store"), run_id, Unit(v, s, True), f)
                assert key.startswith(f"runs/{run_id}/variants/{v}/seed-{s}/"), key
                s3.head_object(Bucket=bucket, Key=f"store/{key}")
    m = manifest(bucket, run_id)
    assert m["params"]["repeats"] == 2
    for v in m["variants"]:
        assert [r["seed"] for r in v["repeats"]] == [3, 4] and v["attempts"] == 1
        low, high = v["val_accuracy_ci"]
        assert low <= v["val_accuracy_mean"] <= high
        assert v["val_accuracy_mean"] == pytest.approx(sum(r["val_accuracy"] for r in v["repeats"]) / 2, abs=1e-6)
    means = {v["name"]: v["val_accuracy_mean"] for v in m["variants"]}
    assert means[m["selected"]] == max(means.values())  # by the mean (a tie goes to the lower mean loss)
    assert m["comparison"]["runner_up"] == ({"none", "flip"} - {m["selected"]}).pop()


def test_fan_out_halving_prunes_the_scrambled_child_at_the_first_rung(cluster, bucket):
    """halving=on through real children: every unit's child trains to the rung (epoch 2) and
    pauses; the scrambled unit, clearly behind, is stopped there and its child ends Cancelled,
    named Pruned; the others' next children resume from their checkpoints to the end. The
    parent is killed after it decided the rung and retried: it reads the decision back,
    starts no child twice and ends as it would have."""
    cluster.ensure_nodes()
    variants = ["none", "flip", "scramble"]
    parent_id = start_run(cluster.env, *TINY, "epochs=3", "patience=3", "halving=on", "halving_min_epochs=2",
                          "halving_factor=2", *fanout(bucket, *variants))
    first = wait_for("the first rung's children", lambda: (k := children(cluster.env, parent_id)) and len(k) == 3 and k,
                     420, cluster)
    run_id = run_id_of(first, [f"{v}-r1" for v in variants])
    s3, decision_key = aws_client("s3"), f"store/runs/{run_id}/halving/rung-1.json"

    def decision():
        try:
            return s3.get_object(Bucket=bucket, Key=decision_key)
        except s3.exceptions.NoSuchKey:
            return None

    # the parent is killed once it decided the rung, and retried as the UI's Retry does
    made = wait_for("rung 1's decision in the store", decision, 900, cluster)
    kill_and_wait(cluster, parent_id)
    cli(cluster.env, "flow-run", "retry", str(parent_id))
    parent = wait_final(cluster, parent_id)
    assert parent.state.is_completed(), f"{parent.state!r}\n{cluster.tail()}"
    assert parent.run_count >= 2
    again = decision()
    assert again["ETag"] == made["ETag"] and again["Body"].read() == made["Body"].read()  # read back, not redecided
    kids = children(cluster.env, parent.id)
    assert sorted(kids) == sorted([f"{run_id}-{v}-r1-a1" for v in variants] + [f"{run_id}-{v}-a1" for v in ("none", "flip")])
    pruned = kids[f"{run_id}-scramble-r1-a1"]
    assert pruned.state.is_cancelled() and pruned.state.name == "Pruned", pruned.state
    assert "clearly behind the leader" in pruned.state.message
    assert all(k.state.is_completed() and k.run_count == 1 for n, k in kids.items() if n != f"{run_id}-scramble-r1-a1")
    assert {kids[f"{run_id}-{v}-r1-a1"].parameters["until_epoch"] for v in variants} == {2}
    assert all("until_epoch" not in kids[f"{run_id}-{v}-a1"].parameters for v in ("none", "flip"))

    m = manifest(bucket, run_id)
    by = {v["name"]: v for v in m["variants"]}
    assert (by["scramble"]["status"], by["scramble"]["epochs_run"], by["scramble"]["pruned"]["rung"]) == ("pruned", 2, 1)
    assert by["none"]["epochs_run"] == by["flip"]["epochs_run"] == 3 and m["selected"] in ("none", "flip")
    assert [s["variant"] for s in m["halving"]["rungs"][0]["stops"]] == ["scramble"]
    # the pruned unit keeps its checkpoint, and its record is the paused one, not a final one
    store = open_store(f"s3://{bucket}/store")
    unit = Unit("scramble", 0)
    assert stored_key(store, run_id, unit, "checkpoint.safetensors") and stored_key(store, run_id, unit, "paused.json")
    assert stored_key(store, run_id, unit, "metrics.json") is None


def test_sigterm_reschedules_the_same_child_which_resumes(cluster, bucket):
    """A graceful eviction: the pod gets SIGTERM. The same child flow run goes
    AwaitingRetry, is picked up again and resumes at the next epoch."""
    parent, kid, run_id = one_child_two_epochs_in(cluster, bucket)
    kill([top_process(kid.id)], signal.SIGTERM)  # as the kubelet signals a pod's main process

    parent_run = wait_final(cluster, parent)
    assert parent_run.state.is_completed(), f"{parent_run.state!r}\n{cluster.tail()}"
    kid = flow_run(cluster.env, kid.id)
    assert kid.state.is_completed() and kid.run_count == 2, kid
    with client(cluster.env) as c:
        states = [s.name for s in c.read_flow_run_states(kid.id)]
    assert "AwaitingRetry" in states, states
    h = history(bucket, run_id, "flip")
    assert list(h["epoch"]) == [1, 2, 3, 4, 5, 6]  # each epoch exactly once
    # resumed at the next epoch: right after the last one in the store when it stopped
    resumed = epochs_logged(cluster.env, [kid.id], "flip", after_resume=True)
    assert resumed == list(range(resumed[0], 7)) and resumed[0] >= 3, resumed
    logged = epochs_logged(cluster.env, [kid.id], "flip")
    assert len(logged) - len(set(logged)) <= 1, logged  # at most the epoch in flight was trained again
    assert manifest(bucket, run_id)["variants"][0]["attempts"] == 1  # the same flow run, not a new attempt


def test_sigkill_of_a_child_and_its_worker_starts_a_new_attempt_that_resumes(cluster, bucket):
    """A node lost without a word: the child and its worker are SIGKILLed. The zombie
    automation marks attempt 1 Crashed; the parent starts attempt 2 on the other node,
    which takes over the lease and resumes from the checkpoint."""
    parent, kid, run_id = one_child_two_epochs_in(cluster, bucket)
    node = next(n for n in NODES if set(run_processes(kid.id)) & set(descendants(cluster.workers[n].pid)))
    kill([cluster.workers[node].pid, *descendants(cluster.workers[node].pid)], signal.SIGKILL)
    cluster.workers[node].wait(timeout=10)
    stored_at_kill = len(history(bucket, run_id, "flip"))

    parent_run = wait_final(cluster, parent, timeout=600)
    assert parent_run.state.is_completed(), f"{parent_run.state!r}\n{cluster.tail()}"
    kids = children(cluster.env, parent)
    assert kids[f"{run_id}-flip-a1"].state.is_crashed(), kids[f"{run_id}-flip-a1"].state
    second = kids[f"{run_id}-flip-a2"]
    assert second.state.is_completed()
    h = history(bucket, run_id, "flip")
    assert list(h["epoch"]) == [1, 2, 3, 4, 5, 6]
    # attempt 2 began where the store left off, not at epoch 1
    assert epochs_logged(cluster.env, [second.id], "flip", after_resume=True)[0] in (stored_at_kill + 1,
                                                                                    stored_at_kill + 2)
    m = manifest(bucket, run_id)
    assert m["variants"][0]["attempts"] == 2 and m["variants"][0]["status"] in ("completed", "early_stopped")


def test_a_retried_parent_reattaches_to_its_children(cluster, bucket):
    """Kill the parent mid-run, `prefect flow-run retry` it (the UI's Retry): the same
    run id, its children found again through their idempotency keys, nothing trained twice."""
    cluster.ensure_nodes()
    variants = ["none", "flip"]
    parent = start_run(cluster.env, *PACED, "epochs=4", "patience=4", *fanout(bucket, *variants))
    kids = wait_for("both children running", lambda: (k := children(cluster.env, parent)) and len(k) == 2
                    and all(r.state.is_running() for r in k.values()) and k, 180, cluster)
    run_id = run_id_of(kids, variants)
    wait_for("an epoch in the store", lambda: history(bucket, run_id, "none") is not None, 240, cluster)
    kill_and_wait(cluster, parent)

    cli(cluster.env, "flow-run", "retry", str(parent))
    parent_run = wait_final(cluster, parent)
    assert parent_run.state.is_completed(), f"{parent_run.state!r}\n{cluster.tail()}"
    assert parent_run.run_count >= 2
    after = children(cluster.env, parent)
    assert sorted(after) == sorted(f"{run_id}-{v}-a1" for v in variants)  # no duplicates, no new attempts
    assert all(r.run_count == 1 and r.state.is_completed() for r in after.values())
    m = manifest(bucket, run_id)  # the same run id: the retry continued the run
    assert m["run_id"] == run_id and m["flow_run_id"] == str(parent)
    for v in variants:
        assert list(history(bucket, run_id, v)["epoch"]) == [1, 2, 3, 4]
        assert len(epochs_logged(cluster.env, [after[f"{run_id}-{v}-a1"].id], v)) == 4


def test_in_process_run_killed_then_retried_resumes(cluster, bucket):
    """The bug report: kill -9 of an in-process run mid-variant, then `prefect flow-run
    retry`: the same run continues from its checkpoint instead of starting over."""
    params = [*PACED, "epochs=5", "patience=5", f"store=s3://{bucket}/store", 'variants=["flip"]']
    parent = start_run(cluster.env, *params)
    prefix = "store/runs/"

    def run_ids():
        listing = aws_client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):].split("/")[0] for o in listing}

    run_id = wait_for("the run in the store", lambda: next(iter(run_ids()), None), 180, cluster)
    wait_for("two epochs in the store", lambda: (h := history(bucket, run_id, "flip")) is not None and len(h) >= 2,
             240, cluster)
    kill_and_wait(cluster, parent)
    stored_at_kill = len(history(bucket, run_id, "flip"))

    cli(cluster.env, "flow-run", "retry", str(parent))
    run = wait_final(cluster, parent)
    assert run.state.is_completed(), f"{run.state!r}\n{cluster.tail()}"
    assert run_ids() == {run_id}  # one run folder: the retry continued it
    assert manifest(bucket, run_id)["flow_run_id"] == str(parent)
    assert list(history(bucket, run_id, "flip")["epoch"]) == [1, 2, 3, 4, 5]
    # the retry went on from the store's last epoch (its checkpoint goes up before its
    # history: a kill between the two leaves the history one epoch behind)
    resumed = epochs_logged(cluster.env, [parent], "flip", after_resume=True)
    assert resumed == list(range(resumed[0], 6)) and resumed[0] in (stored_at_kill + 1, stored_at_kill + 2), resumed
    logged = epochs_logged(cluster.env, [parent], "flip")
    assert len(logged) - len(set(logged)) <= 1, logged  # at most the epoch in flight at the kill


def test_a_second_writer_of_a_leased_variant_is_refused_naming_the_owner(cluster, bucket):
    """Two parents with the same run id: the second stops instead of training alongside."""
    # long enough that the second parent comes while the first still trains
    params = [*PACED, "epochs=12", "patience=12", f"store=s3://{bucket}/store", 'variants=["flip"]',
              "run_id=dup-1"]
    first = start_run(cluster.env, *params)
    wait_for("an epoch in the store", lambda: history(bucket, "dup-1", "flip") is not None, 180, cluster)
    second = wait_final(cluster, start_run(cluster.env, *params), timeout=180)
    assert second.state.is_failed(), second.state
    assert "LeaseHeld" in second.state.message and f"being trained by flow run {first}" in second.state.message
    done = wait_final(cluster, first)
    assert done.state.is_completed(), f"{done.state!r}\n{cluster.tail()}"
    assert list(history(bucket, "dup-1", "flip")["epoch"]) == list(range(1, 13))
    assert manifest(bucket, "dup-1")["flow_run_id"] == str(first)


def test_children_unfinished_at_the_deadline_are_cancelled_and_reported(cluster, bucket):
    cluster.ensure_nodes()
    parent = start_run(cluster.env, *PACED, "epochs=60", "patience=60", "fanout_deadline_hours=0.01",
                       *fanout(bucket, "none", "flip"))
    run = wait_final(cluster, parent, timeout=300)
    assert run.state.is_failed(), run.state  # nothing left to select
    assert "not finished within the fan-out deadline (0.01 h); cancelled" in run.state.message, run.state.message
    kids = children(cluster.env, parent)
    assert len(kids) == 2
    wait_for("the children to be cancelled", lambda: all(
        flow_run(cluster.env, k.id).state.is_cancelled() for k in kids.values()), 120, cluster)

    # Retry: the cancelled children are not re-attached (that would cancel the run): each
    # unit gets its next attempt, which meets the same deadline
    run_id = run_id_of(kids, ["none", "flip"])
    cli(cluster.env, "flow-run", "retry", str(parent))
    run = wait_final(cluster, parent, timeout=300)
    assert run.state.is_failed(), f"{run.state!r}\n{cluster.tail()}"
    assert "not finished within the fan-out deadline" in run.state.message, run.state.message
    assert sorted(children(cluster.env, parent)) == sorted(f"{run_id}-{v}-a{n}" for v in ("none", "flip")
                                                            for n in (1, 2))


def test_a_cancelled_child_cancels_the_run(cluster, bucket):
    """Someone cancels one child (in the UI, or `prefect flow-run cancel`): the run is
    cancelled, and so are its other children."""
    cluster.ensure_nodes()
    parent = start_run(cluster.env, *PACED, "epochs=60", "patience=60", *fanout(bucket, "none", "flip"))
    kids = wait_for("both children running", lambda: (k := children(cluster.env, parent)) and len(k) == 2
                    and all(r.state.is_running() for r in k.values()) and k, 180, cluster)
    run_id = run_id_of(kids, ["none", "flip"])
    cli(cluster.env, "flow-run", "cancel", str(kids[f"{run_id}-none-a1"].id))
    run = wait_final(cluster, parent, timeout=180)
    assert run.state.is_cancelled(), run.state
    assert f"none: flow run {run_id}-none-a1" in run.state.message and "was cancelled" in run.state.message
    wait_for("the other child to be cancelled",
             lambda: flow_run(cluster.env, kids[f"{run_id}-flip-a1"].id).state.is_cancelled(), 120, cluster)
