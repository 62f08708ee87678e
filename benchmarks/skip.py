"""How long a run that finds nothing changed takes to end `Skipped`, beside a full run of
the same deployment.

    python -m benchmarks.skip [--repeats 3]

Against a `prefect server start` and the project's process worker (both started here,
on free loopback ports with their own Prefect home), the local deployment
train-cifar/local is run through the API call `prefect deployment run` makes. The first
run trains and becomes the champion; then, in rounds, the same parameters again (it
ends Skipped) and the same with force=true (it trains all of it again: the baseline).
Seconds are from the request to the final state as the client sees it, so the worker's
polling and the flow run's process start count; `pickup_s` is the part before the run
was Running, `run_s` the server's run time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchmarks.common import machine, table, write_result

REPO = Path(__file__).resolve().parent.parent
PARAMS = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200, "variants": ["none", "flip"],
          "epochs": 2, "subset": 300}
GOAL_S = 15.0


def one_run(c, deployment_id, params: dict) -> dict:
    t0 = time.monotonic()
    run = c.create_flow_run_from_deployment(deployment_id, parameters=params)
    running_at = None
    while not (run := c.read_flow_run(run.id)).state.is_final():
        if running_at is None and run.state.is_running():
            running_at = time.monotonic()
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    return {"state": run.state.name, "seconds": seconds, "run_s": run.total_run_time.total_seconds(),
            "pickup_s": None if running_at is None else running_at - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from tests.prefect_fixtures import LOCAL_POOL, PREFECT, Processes, cli, client, free_port, start_worker, wait_http

    with tempfile.TemporaryDirectory(prefix="bench-skip-") as tmp:
        tmp = Path(tmp)
        procs = Processes(tmp)
        api = f"http://127.0.0.1:{free_port()}/api"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
               "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_LEVEL": "WARNING", "TRAIN_CIFAR_CACHE": str(tmp / "cache"),
               "PYTHONPATH": str(REPO)}
        params = {**PARAMS, "store": str(tmp / "store")}
        try:
            t = time.monotonic()
            proc, log = procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                                               api.rsplit(":", 1)[1].removesuffix("/api")],
                                    {k: v for k, v in env.items() if k != "PREFECT_API_URL"})
            wait_http(f"{api}/health", 360, proc, log)
            cli(env, "work-pool", "create", LOCAL_POOL, "--type", "process")
            cli(env, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "train-cifar/local")
            start_worker(procs, env, LOCAL_POOL, "bench-skip")
            setup_s = time.monotonic() - t
            print(f"server, deployment and worker up in {setup_s:.1f} s")
            os.environ["PREFECT_API_URL"] = api
            with client(env) as c:
                d = c.read_deployment_by_name("train-cifar/local")
                first = one_run(c, d.id, params)
                print(f"first run (becomes the champion): {first['state']} in {first['seconds']:.1f} s")
                assert first["state"] == "Completed", first
                full, skipped = [], []
                for i in range(args.repeats):
                    skipped.append(one_run(c, d.id, params))
                    full.append(one_run(c, d.id, {**params, "force": True}))
                    print(f"round {i + 1}: skipped in {skipped[-1]['seconds']:.1f} s ({skipped[-1]['state']}), "
                          f"full run {full[-1]['seconds']:.1f} s ({full[-1]['state']})")
        finally:
            procs.stop_all()

    assert all(r["state"] == "Skipped" for r in skipped) and all(r["state"] == "Completed" for r in full)
    rows = [{"side": side, "runs": len(rs), **{k: median(r[k] for r in rs) for k in ("seconds", "pickup_s", "run_s")},
             "max_s": max(r["seconds"] for r in rs)}
            for side, rs in (("skipped (same fingerprint)", skipped), ("full run (force=true)", full))]
    print()
    print(table(rows, ["side", "runs", "seconds", "max_s", "pickup_s", "run_s"]))
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"\nmedian, request to final state: skipped {rows[0]['seconds']:.1f} s, full {rows[1]['seconds']:.1f} s "
          f"({ratio:.0%}); goal under {GOAL_S:.0f} s: {'met' if rows[0]['seconds'] < GOAL_S else 'NOT met'}")
    result = {"machine": machine(), "params": PARAMS, "repeats": args.repeats, "setup_s": setup_s,
              "goal_s": GOAL_S, "rows": rows, "first": first, "skipped": skipped, "full": full}
    write_result("skip", result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
