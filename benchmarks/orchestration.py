"""What the flow adds: a small synthetic run through the train-cifar flow against the
same training called directly.

    python -m benchmarks.orchestration [--repeats 2] [--variants none,flip] [--epochs 3] [--synthetic-train 2500]

Every side is a fresh process on the same machine doing the same work from
nothing: generate the synthetic archive, prepare it, train the variants, select
by validation accuracy, test the selected model once. The defaults are about a
minute of training on the 2-core benchmark machine. The sides run in rounds,
interleaved (direct, embedded, server; then again), so that a drift in the
machine's speed hits all of them.

- direct: cnn/ called from a plain script (this module with --direct), no Prefect.
  It trains the variants as the flow does on a CPU: one lane, one variant after
  another, each using every core. It also writes, without Prefect, the product's
  own outputs that the flow's tasks write (the history CSV, the checkpoint and
  history copied to a local store after every epoch, the best weights, metrics,
  the confusion matrix CSV and plot, the portable torch.export model, the curves
  plot, report and manifest), timed apart.
- flow, embedded: `python -m flows.train_cifar --dataset synthetic --store <folder>
  --device cpu ...` with no API URL: the run starts a temporary API server itself
  (cli/api.py; the Prefect home reused: its database already exists). This is
  `make run`.
- flow, server: the same command with PREFECT_API_URL pointing at a `prefect
  server start` this benchmark started beforehand on a free loopback port, with its
  own Prefect home (idle while the other sides run). This is how deployments run:
  the flow run talks to a server that is already up.
- empty flows, once each: a flow that does nothing, run with plain Prefect (its own
  temporary server, started at the first API call) and against the server: the
  fixed cost of Prefect alone.

What Prefect adds is a flow side's median time outside the training loop (wall
time less the variants' epoch seconds) minus the direct side's, whose outputs are
the same. The training loop is compared apart, as a ratio of medians: were Prefect
to slow training down (its server shares the two cores), that ratio would show
it, and run-to-run noise in a minute of training (a few percent on this VM) does
not swamp the few seconds being measured. All runs must select the same variant
with the same test accuracy (same seeds, same code). CPU seconds are those of the
side's process and the children it waited for; for the server mode the server's
own CPU seconds during the run are added.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
EMPTY_FLOW = "from prefect import flow\n@flow(name='empty')\ndef empty():\n    return 1\nempty()"


def direct(args) -> None:
    """The flow's work with no orchestration; prints one JSON line with its timings."""
    t_outputs = 0.0

    import torch

    from cnn.checkpoint import CHECKPOINT
    from cnn.config import make_config
    from cnn.data import load_splits, prepare
    from cnn.evaluate import evaluate
    from cnn.models import build_model
    from cnn.synthetic import write_archive
    from cnn.train import train

    class outputs:  # noqa: N801 - a timer: `with outputs(): ...` adds to t_outputs
        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            nonlocal t_outputs
            t_outputs += time.perf_counter() - self.t0

    work = Path(args.workdir)
    path, md5 = write_archive(work / "synthetic", args.synthetic_train, args.synthetic_test, seed=0)
    data = load_splits(prepare(path, md5, work / "prepared"), split_seed=0, subset=args.subset)
    cpu = torch.device("cpu")
    cfgs = {v: make_config(args.model, v, epochs=args.epochs, patience=args.patience, seed=0)
            for v in args.variants.split(",")}
    with outputs():
        import pandas as pd
        from safetensors.torch import save_file

        from store import LocalStore

        store = LocalStore(work / "store")
    results: dict[str, dict] = {}
    histories: dict[str, list[dict]] = {}
    for v, cfg in cfgs.items():  # one lane: the flow's plan on a CPU
        vdir = work / "run" / v
        history = histories[v] = []

        def on_epoch(row, ckpt_path, v=v, vdir=vdir, history=history):
            with outputs():  # what train-in-lane does after each epoch, less Prefect's progress artifact
                history.append(row)
                pd.DataFrame(history).to_csv(vdir / "history.csv", index=False)
                store.put_file(f"runs/r/variants/{v}/history.csv", vdir / "history.csv")
                store.put_file(f"runs/r/variants/{v}/{CHECKPOINT}", ckpt_path)

        results[v] = train(cfg, data, cpu, vdir, on_epoch=on_epoch)
        with outputs():
            save_file({k: t.contiguous() for k, t in results[v]["best_state"].items()}, str(vdir / "best.safetensors"))
            store.put_file(f"runs/r/variants/{v}/best.safetensors", vdir / "best.safetensors")
            keep = ("status", "epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds")
            (vdir / "metrics.json").write_text(json.dumps({k: results[v][k] for k in keep}))
            store.put_file(f"runs/r/variants/{v}/metrics.json", vdir / "metrics.json")
    ok = [v for v in cfgs if results[v]["status"] in ("completed", "early_stopped")]
    best = max(ok, key=lambda v: (results[v]["val_accuracy"], -results[v]["val_loss"]))
    model = build_model(args.model, num_classes=len(data.classes))
    model.load_state_dict(results[best]["best_state"])
    model = model.to(memory_format=torch.channels_last)
    test = evaluate(model, data.test_x, data.test_y, cpu, tta=cfgs[best].tta)
    with outputs():  # what test-model and publish-run write, less Prefect's artifacts
        from cnn.export import export_portable
        from run.report import plot_confusion, plot_curves

        out = work / "run" / "model"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({k: test[k] for k in ("loss", "accuracy", "per_class")}))
        pd.DataFrame(test["confusion"], index=data.classes, columns=data.classes).to_csv(out / "confusion_matrix.csv")
        plot_confusion(test["confusion"], data.classes, out / "confusion_matrix.png")
        export_portable(model, out / "model.pt2", tta=cfgs[best].tta)
        for f in ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "model.pt2"):
            store.put_file(f"runs/r/model/{f}", out / f)
        plot_curves({v: pd.DataFrame(h) for v, h in histories.items()}, work / "run" / "curves.png")
        store.put_file("runs/r/curves.png", work / "run" / "curves.png")
        (work / "run" / "manifest.json").write_text(json.dumps({"selected": best, "test": test["accuracy"]}))
        store.put_file("runs/r/manifest.json", work / "run" / "manifest.json")
    print(json.dumps({"selected": best, "test_accuracy": test["accuracy"], "outputs_s": t_outputs,
                      "train_loop_s": sum(r["seconds"] for r in results.values())}))


class PrefectServer:
    """`prefect server start` on a free loopback port with its own Prefect home, in its
    own process group (stopped as a whole)."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.proc: subprocess.Popen | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="false")
        self.log = open(self.home.parent / f"prefect-server-{self.port}.log", "w")  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"prefect server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"prefect server did not answer on {self.api_url} within {timeout:.0f} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU seconds of every live process in the server's process group (/proc)."""
        total = 0.0
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # pgrp: the group the server leads
                total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its waited-for children, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc.stdout


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import add_run_args

    ap = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three sides, interleaved (default 2)")
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # internal: the direct side
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.direct:
        return direct(args)

    from benchmarks.common import machine, table, write_result

    info = machine()
    common = ["--model", args.model, "--variants", args.variants, "--epochs", str(args.epochs),
              "--patience", str(args.patience), "--synthetic-train", str(args.synthetic_train),
              "--synthetic-test", str(args.synthetic_test)] + (["--subset", str(args.subset)] if args.subset else [])
    print(f"{args.model}, variants {args.variants} (one lane), {args.epochs} epochs, synthetic "
          f"{args.synthetic_train}/{args.synthetic_test} images, {args.repeats} rounds; CPU: {info['cores']} cores "
          f"({info['cpu']}); load average at start {info['load_average_at_start']}")
    runs: list[dict] = []  # one per side per round
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = PrefectServer(tmp / "server-home")

        def flow(mode: str, extra_env: dict, round_: int) -> None:
            run = tmp / f"{mode}-{round_}"
            flow_env = {**env, **extra_env, "TRAIN_CIFAR_CACHE": str(run / "cache"), "PREFECT_LOGGING_LEVEL": "WARNING"}
            server_cpu0 = server.cpu_seconds() if mode == "server" else 0.0
            seconds, cpu, out = timed([sys.executable, "-m", "flows.train_cifar", "--dataset", "synthetic",
                                       "--store", str(run / "store"), "--device", "cpu", *common], flow_env)
            server_cpu = server.cpu_seconds() - server_cpu0 if mode == "server" else 0.0
            manifest = json.loads(Path(out.strip().splitlines()[-1]).read_text())
            runs.append({"side": f"flow, {mode}", "seconds": seconds, "cpu_s": cpu + server_cpu,
                         "train_loop_s": sum(v["seconds"] for v in manifest["variants"] if v["seconds"]),
                         "selected": manifest["selected"], "test_accuracy": manifest["test"]["accuracy"]})
            print(f"  round {round_}: flow, {mode}: {seconds:.1f} s (training loop {runs[-1]['train_loop_s']:.1f} s)")

        def empty(extra_env: dict) -> float:
            seconds, _, _ = timed([sys.executable, "-c", EMPTY_FLOW],
                                  {**env, **extra_env, "PREFECT_LOGGING_LEVEL": "WARNING"})
            return seconds

        def direct_side(round_: int) -> None:
            seconds, cpu, out = timed([sys.executable, "-m", "benchmarks.orchestration", "--direct", "--workdir",
                                       str(tmp / f"direct-{round_}"), *common], env)
            r = json.loads(out.strip().splitlines()[-1])
            runs.append({"side": "direct", "seconds": seconds, "cpu_s": cpu, "train_loop_s": r["train_loop_s"],
                         "outputs_s": r["outputs_s"], "selected": r["selected"], "test_accuracy": r["test_accuracy"]})
            print(f"  round {round_}: direct: {seconds:.1f} s (training loop {r['train_loop_s']:.1f} s, "
                  f"outputs {r['outputs_s']:.1f} s)")

        embedded = {"PREFECT_HOME": str(tmp / "prefect-home")}
        served = {"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp / "client-home")}
        empty(embedded)  # creates the home's database, as any run after the first finds it
        started = server.start()  # up before the runs, as in production; idle while the other sides run
        print(f"  prefect server up on {server.api_url} in {started:.1f} s")
        try:
            empties = {"empty flow, embedded (Prefect's own temporary server)": empty(embedded),
                       "empty flow, server": empty(served)}
            for round_ in range(1, args.repeats + 1):  # interleaved: a drift in the machine's speed hits every side
                direct_side(round_)
                flow("embedded", embedded, round_)
                flow("server", served, round_)
        finally:
            server.stop()

    rows = []
    for side in ("direct", "flow, embedded", "flow, server"):
        mine = [r for r in runs if r["side"] == side]
        row = {"side": side, "runs": len(mine)}
        for k in ("seconds", "cpu_s", "train_loop_s"):
            row[k] = median([r[k] for r in mine])
        row["outside_loop_s"] = median([r["seconds"] - r["train_loop_s"] for r in mine])
        if side == "direct":
            row["outputs_s"] = median([r["outputs_s"] for r in mine])
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        # what Prefect adds: the time outside the training loop, against the direct side's (which
        # includes the same outputs); the loop itself is compared apart, as a ratio, so that a
        # slower loop under Prefect would show and run-to-run noise in it does not swamp seconds
        row["prefect_s"] = row["outside_loop_s"] - base["outside_loop_s"]
        row["pct_of_this_run"] = 100 * row["prefect_s"] / base["seconds"]
        row["pct_of_1_min"] = 100 * row["prefect_s"] / 60
        row["loop_vs_direct"] = row["train_loop_s"] / base["train_loop_s"]
    print()
    print(table(rows, ["side", "runs", "seconds", "train_loop_s", "outside_loop_s", "cpu_s", "prefect_s",
                       "pct_of_this_run", "pct_of_1_min", "loop_vs_direct"]))
    for label, seconds in empties.items():
        print(f"{label}: {seconds:.1f} s")
    by = {r["side"]: r for r in rows}
    s, e = by["flow, server"], by["flow, embedded"]
    same = len({(r["selected"], round(r["test_accuracy"], 6)) for r in runs}) == 1
    print(f"\nprefect server start-up (once, not per run): {started:.1f} s")
    for label, r in (("against a running prefect server (how deployments run)", s),
                     ("embedded (`make run`: the CLI starts a temporary API server)", e)):
        print(f"{label}: Prefect adds {r['prefect_s']:.1f} s outside the training loop, {r['pct_of_1_min']:.1f}% of "
              f"a 1-minute run ({r['pct_of_this_run']:.1f}% of this {base['seconds']:.0f} s one); its training loop "
              f"took {r['loop_vs_direct']:.3f}x the direct one's")
    print(f"all runs selected the same variant with the same test accuracy: {same}")
    result = {"machine": info, "params": {k: v for k, v in vars(args).items() if k not in ("direct", "workdir")},
              "server_start_s": started, "same_result": same, "rows": rows, "runs": runs, "empty_flows": empties}
    print(f"wrote {write_result('orchestration', result)}")
    return result


if __name__ == "__main__":
    main()
