"""Where the test suite's CPU time goes, by kind of process.

    python -m benchmarks.suite_cpu [--workers 5] [--result suite_cpu] [-- PYTEST ARGS]

Runs the suite as `make test` does and records, for every Python process it starts
(servers, workers, flow runs, moto, the CLI), its own CPU seconds: a `.pth` file put in
this environment's site-packages for the run (removed after, on SIGTERM too; one that a
SIGKILL leaves behind does nothing once this process is gone) starts a thread in each
process that writes its `os.times()` every 3 s and at exit, so a process killed by a test
still counts up to its last 3 s. What is not Python (the browser) is the rest of the
suite's total. On 2 cores the suite's CPU time, not its waiting, sets how long it takes
(README.md, Tests).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import machine, table, write_result

PROBE = '''import json, os, sys, threading, time
def start(folder, owner):
    try:  # a probe left behind by a benchmark that was SIGKILLed does nothing
        os.kill(owner, 0)
    except OSError:
        return
    t0 = time.time()
    def write():
        t = os.times()
        try:
            with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
                json.dump({"argv": " ".join(sys.argv)[:300], "cpu": t.user + t.system, "wall": time.time() - t0}, f)
        except OSError:
            pass
    def loop():
        while True:
            time.sleep(3)
            write()
    import atexit
    atexit.register(write)
    threading.Thread(target=loop, daemon=True, name="suite-cpu-probe").start()
'''

# (what the command line holds, the kind it is counted as); the first that matches
KINDS = [("prefect/engine.py", "flow run started by a process worker"),
         ("prefect.engine", "flow run started by a process worker"),
         ("runner/_workspace", "flow run started by `prefect flow-run execute`"),
         ("supervisor.json", "flow run started by `prefect flow-run execute`"),
         ("server start", "`prefect server start`"),
         ("uvicorn", "temporary Prefect server (test harness, CLI runs)"),
         ("deployments/worker.py", "Prefect worker"), ("worker start", "Prefect worker"),
         ("-c -H 127.0.0.1 -p", "moto S3 server"),
         ("flows/train_cifar.py", "the run's CLI (`make run`'s command)"), ("cli/", "the other CLIs (predict, mirror)"),
         ("bin/prefect", "prefect CLI commands"), ("pytest/__main__", "pytest (main process)"),
         ("lease_writer.py", "test helpers")]


def kind(argv: str) -> str:
    if argv == "-c":  # how execnet starts a pytest-xdist worker
        return "pytest-xdist worker (tests run in process)"
    found = next((name for needle, name in KINDS if needle in argv), None)
    if found is None and argv.startswith("-c "):  # a test's `python -c` driving the run's CLI
        found = "the run's CLI (`make run`'s command)"
    return found or "other Python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=5, help="pytest-xdist workers, as make test's TEST_WORKERS")
    ap.add_argument("--result", default="suite_cpu",
                    help="benchmarks/results/<name>.json (another name for part of the suite)")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (a file, -k ...)")
    args = ap.parse_args()
    if not re.fullmatch(r"[\w-]+", args.result):  # before the suite's 20 minutes, not after
        ap.error(f"--result: expected a file name without folder or .json (letters, digits, - and _), "
                 f"found {args.result!r}")
    try:  # the code measured, read before the run (a tree without git still gets its figures)
        code = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        code = None

    records = Path(tempfile.mkdtemp(prefix="suite-cpu-"))
    site = Path(sysconfig.get_paths()["purelib"])
    probe, pth = site / "_suite_cpu_probe.py", site / "zz_suite_cpu_probe.pth"
    probe.write_text(PROBE)
    # a SIGTERM (a timeout, a closed terminal) still takes the probe out again below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    pth.write_text(f"import _suite_cpu_probe; _suite_cpu_probe.start({str(records)!r}, {os.getpid()})\n")
    start, info = time.monotonic(), machine()
    try:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-n", str(args.workers), "--dist", "loadgroup",
                              "--no-loadscope-reorder", "-q", *args.pytest_args])
    finally:
        pth.unlink(missing_ok=True)
        probe.unlink(missing_ok=True)
    wall = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime  # every process the suite waited for, Python or not

    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for f in records.glob("*.json"):
        try:
            r = json.loads(f.read_text())
        except ValueError:  # caught mid-write by a kill
            continue
        by_kind[kind(r["argv"])][0] += 1
        by_kind[kind(r["argv"])][1] += r["cpu"]
    python = sum(cpu for _, cpu in by_kind.values())
    # the rusage counts only processes reaped through the chain (not those orphaned by a kill,
    # nor anything left when pytest is interrupted): never less than what the probes saw
    total = max(total, python)
    rows = [{"kind": k, "processes": n, "cpu_min": cpu / 60, "share": f"{100 * cpu / total:.0f}%"}
            for k, (n, cpu) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])]
    rows.append({"kind": "not Python (the browser, git, make)", "processes": None,
                 "cpu_min": max(total - python, 0) / 60, "share": f"{100 * max(total - python, 0) / total:.0f}%"})
    print(table(rows, ["kind", "processes", "cpu_min", "share"]))
    print(f"pytest exited {rc}; {wall / 60:.1f} min wall, {total / 60:.1f} min CPU on {os.cpu_count()} cores")
    write_result(args.result, {"machine": info, "code": code, "workers": args.workers,
                               "pytest_args": args.pytest_args,
                               "exit_code": rc, "wall_s": round(wall, 1), "cpu_s": round(total, 1),
                               "by_kind": rows})


if __name__ == "__main__":
    main()
