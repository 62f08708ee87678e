"""Where a flow run's time goes: one run of the train-cifar flow in this process, with
wall-clock timers around its parts.

    python -m benchmarks.flow_profile [--variants none,flip] [--epochs 3] [--server]

Same run as `benchmarks.orchestration` (seed, synthetic 2,500 / 1,000 images, CPU).
Without `--server` it runs on embedded Prefect (a temporary API server started by the
run, in a new Prefect home); with `--server` it first starts `prefect server start`
on a free loopback port (its own Prefect home) and points the run at it, as a
deployment's run is. Prints:

- the run's phases: imports, from the flow call to its first line (API server
  start-up, flow run creation), the flow's body, and after it (flow run end);
- inside the body: each task's own function, the time between them (orchestration),
  and inside the tasks the parts that are not training: store copies, history CSVs,
  progress artifacts, the test evaluation, the confusion and curve plots, the
  portable export, the UI artifacts;
- the CPU seconds used by the API server process while the run went on (it shares
  the machine's cores with training).

Timers are wall-clock and nest (a store copy inside a training task counts in both);
with one training lane on the CPU nothing overlaps. Writes
benchmarks/results/flow_profile[-server].json.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)
MARKS: dict[str, float] = {}
_LOCK = threading.Lock()


def record(label: str, seconds: float) -> None:
    with _LOCK:
        TIMES[label].append(seconds)


def wrap(owner, attr: str, label: str) -> None:
    """Replace owner.attr by the same callable, timed under `label`."""
    real = getattr(owner, attr)

    @functools.wraps(real)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            record(label, time.perf_counter() - t0)

    setattr(owner, attr, timed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its waited-for children (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def instrument() -> None:
    """Timers around the parts of the tasks that are not training."""
    import cnn.train
    import store.local
    import flows.variants
    import tasks.artifacts
    import tasks.data
    import tasks.publish
    import tasks.selection
    import tasks.testing
    import tasks.training
    from flows import train_cifar as ft

    for t in (tasks.data.fetch_dataset, tasks.training.train_in_lane, tasks.selection.select_variant,
              tasks.testing.test_model, tasks.publish.publish_run):
        wrap(t, "fn", f"task body: {t.name}")
    # the flow's body runs from its first call (devices_for, after parameter checks) to its
    # last (_summary); the flow function itself is not wrapped (Prefect reads its signature)
    for owner, name, mark in ((flows.variants, "devices_for", "body_start"), (ft, "_summary", "body_end")):
        real = getattr(owner, name)

        def marked(*a, _real=real, _mark=mark, **k):
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                MARKS.setdefault(_mark, t if _mark == "body_start" else time.perf_counter())

        setattr(owner, name, marked)
    wrap(store.local.LocalStore, "put_file", "store: put_file (copy + sha256)")
    wrap(store.local.LocalStore, "get_file", "store: get_file")
    wrap(cnn.train, "save_checkpoint", "train: checkpoint save")
    wrap(cnn.train, "evaluate", "train: validation")
    wrap(cnn.train, "train_one_epoch", "train: training pass")
    for name in ("load_dataset", "train", "create_progress_artifact", "update_progress_artifact"):
        wrap(tasks.training, name, f"train-in-lane: {name}")
    real_train = tasks.training.train

    def train_with_timed_on_epoch(cfg, data, device, workdir, on_epoch=None):
        def on_epoch_timed(row, path):
            t0 = time.perf_counter()
            try:
                on_epoch(row, path)
            finally:
                record("train-in-lane: on_epoch (log, CSV, uploads, progress)", time.perf_counter() - t0)
        return real_train(cfg, data, device, workdir, on_epoch=on_epoch_timed if on_epoch else None)

    tasks.training.train = train_with_timed_on_epoch
    for name in ("load_dataset", "evaluate", "plot_confusion", "export_portable"):
        wrap(tasks.testing, name, f"test-model: {name}")
    for name in ("plot_curves", "git_sha", "versions"):
        wrap(tasks.publish, name, f"publish-run: {name}")
    for name in ("create_table_artifact", "create_markdown_artifact", "create_link_artifact"):
        wrap(tasks.artifacts, name, f"run artifacts: {name}")
    wrap(tasks.training, "device_name", "train-in-lane: device_name")


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import add_run_args

    ap = argparse.ArgumentParser(prog="python -m benchmarks.flow_profile", description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--server", action="store_true", help="run against a `prefect server` started first")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flow-profile-") as tmp:
        return _in(args, Path(tmp))


def _in(args, tmp: Path) -> dict:
    os.environ.update(PREFECT_HOME=str(tmp / "prefect-home"), TRAIN_CIFAR_CACHE=str(tmp / "cache"),
                      PREFECT_LOGGING_LEVEL="WARNING")
    server = None
    if args.server:
        from benchmarks.orchestration import PrefectServer

        server = PrefectServer(tmp / "server-home")
        server.start()
        os.environ["PREFECT_API_URL"] = server.api_url
    try:
        return _run(args, tmp, server)
    finally:
        if server is not None:
            server.stop()


def _run(args, tmp: Path, server) -> dict:
    t_import = time.perf_counter()
    import prefect  # noqa: F401

    t_prefect = time.perf_counter()
    import torch  # noqa: F401

    t_torch = time.perf_counter()
    import flows.train_cifar as ft

    instrument()
    t_flow_mod = time.perf_counter()
    from benchmarks.common import machine, table, write_result

    info = machine()
    server_cpu0 = server.cpu_seconds() if server else None
    t0 = time.perf_counter()
    out = ft.train_cifar(dataset="synthetic", synthetic_train=args.synthetic_train,
                         synthetic_test=args.synthetic_test, model=args.model, variants=args.variants.split(","),
                         epochs=args.epochs, patience=args.patience, store=str(tmp / "store"), device="cpu")
    t_end = time.perf_counter()
    if server:
        server_pid, server_cpu = server.pid, server.cpu_seconds() - server_cpu0
    else:
        from prefect.server.api.server import SubprocessASGIServer

        procs = [s.server_process for s in SubprocessASGIServer._instances.values() if s.server_process]
        server_pid = procs[0].pid if procs else None
        server_cpu = cpu_seconds(server_pid) if server_pid else None  # it started with the run
        for s in list(SubprocessASGIServer._instances.values()):
            s.stop()  # now, while its Prefect home (in the temporary folder) is still there
    body = MARKS["body_end"] - MARKS["body_start"]
    task_total = sum(sum(v) for k, v in TIMES.items() if k.startswith("task body"))
    rows = [
        {"part": "import prefect", "seconds": t_prefect - t_import},
        {"part": "import torch", "seconds": t_torch - t_prefect},
        {"part": "import flows.train_cifar (tasks, pandas, matplotlib, ...)", "seconds": t_flow_mod - t_torch},
        {"part": "flow call, total", "seconds": t_end - t0},
        {"part": "  outside the flow body (server start-up, flow run start and end)", "seconds": (t_end - t0) - body},
        {"part": "  flow body", "seconds": body},
        {"part": "    outside task bodies (submitting, waiting, task states)", "seconds": body - task_total},
    ]
    for k in sorted(TIMES):
        rows.append({"part": "    " + k, "seconds": sum(TIMES[k]), "calls": len(TIMES[k])})
    rows.append({"part": "API server CPU seconds during the run", "seconds": server_cpu})
    mode = "prefect server" if server else "embedded (temporary server)"
    print(f"{args.model}, variants {args.variants}, {args.epochs} epochs, synthetic {args.synthetic_train}/"
          f"{args.synthetic_test}; Prefect: {mode}; selected {out['selected']}, test accuracy {out['test_accuracy']:.4f}")
    print(table(rows, ["part", "seconds", "calls"]))
    result = {"machine": info, "mode": mode, "params": vars(args), "rows": rows, "server_pid": server_pid,
              "selected": out["selected"], "test_accuracy": out["test_accuracy"]}
    print(f"wrote {write_result('flow_profile' + ('-server' if server else ''), result)}")
    return result


if __name__ == "__main__":
    main()
    sys.stdout.flush()
