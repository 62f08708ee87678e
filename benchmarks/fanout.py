"""What fan-out costs and what a fault loses: variants as flow runs of their own on
process workers, against the in-process path, in the same run.

    python -m benchmarks.fanout [--variants none,flip] [--epochs 3] [--subset 1200] [--skip-faults]

It starts what tests/test_fanout.py starts: a `prefect server` on a free loopback
port with its own Prefect home, the four pools and the two local deployments, a
process worker for the parent, and one process worker with `--limit 1` per variant
on the variant pool (each a "GPU node" with its own cache), plus the zombie
automation. The store is a local folder (an absolute path every worker reaches).

- overhead: the same synthetic run, in-process (train-cifar/local) and fanned out
  (`variant_deployment=train-variant/local`), one after the other. For each
  variant: seconds from the parent flow run's start to the start of its first
  epoch (the first epoch's log line less that epoch's own seconds), and the whole
  run's wall time. In-process the variants take turns (one CPU lane); fanned out
  they start together, each in a fresh process that imports torch and Prefect.
- faults: SIGTERM of a child (an eviction), SIGKILL of a child and its worker (a
  lost node; the zombie automation notices after its window), SIGKILL of the parent
  then `prefect flow-run retry`, and SIGKILL of an in-process run then retry. For
  each: epochs trained again (epoch lines logged more than once), the part of the
  epoch in flight at the kill that was lost, and seconds from the kill until
  training went on.

Every figure comes from Prefect's own records (flow run start times, log
timestamps) and the store's history.csv, not from timers in this script.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import pandas as pd

from benchmarks.common import machine, table, write_result
from tests.prefect_fixtures import (LOCAL_POOL, PREFECT, REPO, VARIANT_POOL, Processes, cli, client, create_pools,
                                    deploy_all, descendants, free_port, kill, run_processes, start_worker, top_process,
                                    wait_http)

# the process worker's own report of a killed run comes up to half a minute after its
# runner's; a retry before it would be marked Crashed by it (tests/test_fanout.py)
WORKER_DONE = "prefect.flow_runs.worker - Check whether the flow run exceeded its memory allocation"
EPOCH_LINE = re.compile(r"(\S+) epoch (\d+)/\d+ .* ([0-9.]+)s \(")


class Bench:
    def __init__(self, tmp: Path, nodes: int):
        self.tmp, self.procs = tmp, Processes(tmp)
        home = tmp / "prefect-home"
        home.mkdir()
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp), "PREFECT_HOME": str(home),
                    "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_LOGGING_LEVEL": "INFO"}
        proc, log = self.procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                                                str(port)], {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"})
        wait_http(f"{api}/health", 120, proc, log)
        create_pools(self.env)
        deploy_all(self.env, tmp)
        subprocess.run([sys.executable, "deployments/add_automations.py", "--zombie-after", "45"], env=self.env,
                       cwd=REPO, check=True, capture_output=True)
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.start("parent", LOCAL_POOL)
        self.nodes = [f"node-{i}" for i in range(nodes)]
        self.ensure_nodes()

    def start(self, name: str, pool: str, *extra: str) -> None:
        env = {**self.env, "TRAIN_CIFAR_CACHE": str(self.tmp / f"cache-{name}")}
        self.workers[name], self.logs[name] = start_worker(self.procs, env, pool, name, *extra)

    def ensure_nodes(self) -> None:
        for n in self.nodes:
            if n not in self.workers or self.workers[n].poll() is not None:
                self.start(n, VARIANT_POOL, "--limit", "1")

    def run(self, *params: str) -> uuid.UUID:
        args = ["deployment", "run", "train-cifar/local"]
        for p in params:
            args += ["-p", p]
        return uuid.UUID(re.search(r"UUID:\s*([0-9a-f-]{36})", cli(self.env, *args).stdout).group(1))

    def flow_run(self, run_id):
        with client(self.env) as c:
            return c.read_flow_run(run_id)

    def wait(self, check, timeout: float = 900, every: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if got := check():
                return got
            time.sleep(every)
        raise TimeoutError("the benchmark's run did not get there in time; see the logs in " + str(self.tmp))

    def finished(self, run_id):
        return self.wait(lambda: (r := self.flow_run(run_id)).state.is_final() and r, every=2)

    def children(self, parent) -> dict:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with client(self.env) as c:
            return {r.name: r for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))}

    def epochs(self, run_ids: list) -> list[dict]:
        """Every epoch line these flow runs logged: variant, epoch, end time, seconds."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        with client(self.env) as c:
            logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(run_ids))), sort=LogSort.TIMESTAMP_ASC)
        return [{"variant": m.group(1), "epoch": int(m.group(2)), "end": log.timestamp, "seconds": float(m.group(3))}
                for log in logs if (m := EPOCH_LINE.match(log.message))]


def overhead(b: Bench, common: list[str], variants: list[str], store: Path) -> list[dict]:
    rows = []
    for mode, extra in (("in-process", []), ("fan-out", ["variant_deployment=train-variant/local"])):
        parent = b.run(*common, f"store={store / mode}", *extra)
        done = b.finished(parent)
        assert done.state.is_completed(), done.state
        ids = [parent, *(k.id for k in b.children(parent).values())]
        for v in variants:
            first = next(e for e in b.epochs(ids) if e["variant"] == v and e["epoch"] == 1)
            rows.append({"mode": mode, "variant": v,
                         "to_first_epoch_s": (first["end"] - done.start_time).total_seconds() - first["seconds"],
                         "first_epoch_s": first["seconds"], "run_wall_s": done.total_run_time.total_seconds()})
    return rows


def fault(b: Bench, name: str, params: list[str], store: Path, epochs: int) -> dict:
    """Start a one-variant run, wait for two epochs in the store, apply the fault, measure."""
    b.ensure_nodes()
    fanned = any(p.startswith("variant_deployment=") for p in params)
    parent = b.run(*params, f"store={store / name}")
    # every history a writer uploaded (the current one among them), under its generation's slots
    histories = lambda: list((store / name / "runs").glob("*/variants/flip/gen-*/*/history.csv"))  # noqa: E731
    b.wait(lambda: any(h.stat().st_size > 1 and len(pd.read_csv(h)) >= 2 for h in histories()))
    child = next(iter(b.children(parent).values()), None) if fanned else None
    target = child.id if child else parent
    killed_at = datetime.now().astimezone()
    if name == "sigterm-child":
        kill([top_process(target)], signal.SIGTERM)
    elif name == "sigkill-child-and-worker":
        node = next(n for n in b.nodes if set(run_processes(target)) & set(descendants(b.workers[n].pid)))
        kill([b.workers[node].pid, *descendants(b.workers[node].pid)], signal.SIGKILL)
    else:  # the parent (fan-out) or the in-process run, then a retry once its worker is done with it
        done_before = b.logs["parent"].read_text().count(WORKER_DONE)
        kill(run_processes(parent), signal.SIGKILL)
        b.wait(lambda: b.flow_run(parent).state.is_crashed())
        b.wait(lambda: b.logs["parent"].read_text().count(WORKER_DONE) > done_before)
        cli(b.env, "flow-run", "retry", str(parent))
    done = b.finished(parent)
    assert done.state.is_completed(), (name, done.state)
    ids = [parent, *(k.id for k in b.children(parent).values())]
    lines = [e for e in b.epochs(ids) if e["variant"] == "flip"]
    before = [e for e in lines if e["end"] <= killed_at]
    after = [e for e in lines if e["end"] > killed_at]
    resumed = (after[0]["end"] - killed_at).total_seconds() - after[0]["seconds"] if after else None
    stopped = resumed is not None and resumed > 0  # a child the fault did not touch trained on
    # the part of the epoch in flight at the kill: an upper bound, as the killed process's
    # last log lines may not have reached the server (then it counts a whole epoch)
    in_flight = (killed_at - before[-1]["end"]).total_seconds() / before[-1]["seconds"] if before and stopped else 0.0
    retrained = len(lines) - len({e["epoch"] for e in lines})
    return {"fault": name, "epochs_retrained": retrained, "epoch_in_flight_lost": round(min(in_flight, 1.0), 2),
            "epochs_lost": round(retrained + min(in_flight, 1.0), 2), "resumed_at_epoch": after[0]["epoch"] if after else None,
            "seconds_until_training_again": resumed if stopped else 0.0, "training_stopped": stopped, "attempts": len(ids) - 1 if fanned else done.run_count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="none,flip")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=1200)
    ap.add_argument("--skip-faults", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    synthetic = ["dataset=synthetic", "synthetic_train=1500", "synthetic_test=400", f"subset={args.subset}"]
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        b = Bench(Path(tmp), nodes=len(variants))
        store = Path(tmp) / "store"
        try:
            common = [*synthetic, f"epochs={args.epochs}", f"patience={args.epochs}", f"variants={json.dumps(variants)}"]
            rows = overhead(b, common, variants, store)
            print(table(rows, ["mode", "variant", "to_first_epoch_s", "first_epoch_s", "run_wall_s"]))
            faults = []
            if not args.skip_faults:
                one = [*synthetic, "epochs=6", "patience=6", 'variants=["flip"]']
                fan = [*one, "variant_deployment=train-variant/local"]
                for name, params in (("sigterm-child", fan), ("sigkill-child-and-worker", fan),
                                     ("sigkill-parent-then-retry", fan), ("sigkill-in-process-then-retry", one)):
                    faults.append(fault(b, name, params, store, 6))
                    print(faults[-1], flush=True)
                print(table(faults, ["fault", "epochs_retrained", "epoch_in_flight_lost", "epochs_lost",
                                     "resumed_at_epoch", "seconds_until_training_again", "attempts"]))
        finally:
            b.procs.stop_all()
    write_result("fanout", {"machine": machine(), "args": vars(args), "overhead": rows, "faults": faults})


if __name__ == "__main__":
    main()
