"""CPU lanes: variants trained one after another vs at once in threads, on the CPU.

    python -m benchmarks.cpu_lanes [--variants none,flip] [--images 3000] [--epochs 2]

The flow gives the CPU one lane (flows/train_cifar.py): variants in turn, each using
every core through PyTorch's intra-op threads, run in the flow's own (main) thread.
Three sides: that lane in the main thread; the same lane in one worker thread (where
a Prefect task-runner thread would run it); one thread per variant, all at once (as
the flow does on a GPU with --variants-per-gpu), each `cnn.train.train` call then
sharing the same cores. Each side runs in its own fresh
process with the same work (same configs, seeds and synthetic data), and the
variants' results are compared: they must match whichever way they ran.
Sizes: seed model, `--images` synthetic training images, 1,000 hold-out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def side(args) -> None:
    """One side in this process: prints one JSON line."""
    import torch

    from benchmarks.common import synthetic_images
    from cnn.config import make_config
    from cnn.data import Splits
    from cnn.train import train

    x, y = synthetic_images(args.images + 1000, seed=0)
    n = args.images
    data = Splits(x[:n], y[:n], x[n : n + 650], y[n : n + 650], x[n + 650 :], y[n + 650 :],
                  [f"c{i}" for i in range(10)])
    cfgs = {v: make_config(args.model, v, epochs=args.epochs, patience=args.epochs, seed=0)
            for v in args.variants.split(",")}
    cpu = torch.device("cpu")
    work = Path(args.workdir)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    def lane():
        for v, cfg in cfgs.items():
            results[v] = train(cfg, data, cpu, work / v)

    if args.side == "sequential":
        lane()
    elif args.side == "worker":
        t = threading.Thread(target=lane)
        t.start()
        t.join()
    else:
        threads = [threading.Thread(target=lambda v=v: results.__setitem__(v, train(cfgs[v], data, cpu, work / v)))
                   for v in cfgs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "torch_threads": torch.get_num_threads(),
                      "val_accuracy": {v: r["val_accuracy"] for v, r in results.items()}}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_lanes", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="seed")
    ap.add_argument("--variants", default="none,flip;none,flip,crop",
                    help="variant sets separated by ';', each measured both ways")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--side", choices=["sequential", "worker", "threads"], help=argparse.SUPPRESS)  # internal
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        return side(args)

    from benchmarks.common import machine, table, write_result

    info = machine()
    print(f"{args.model}, {args.images} synthetic training images, {args.epochs} epochs per variant; "
          f"CPU: {info['cores']} cores ({info['cpu']}); load average at start {info['load_average_at_start']}")
    rows = []
    for variants in args.variants.split(";"):
        got = {}
        for how in ("sequential", "worker", "threads"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "benchmarks.cpu_lanes", "--side", how, "--workdir", tmp,
                       "--model", args.model, "--variants", variants, "--images", str(args.images),
                       "--epochs", str(args.epochs)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            got[how] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {variants}, {how}: {got[how]['seconds']:.1f} s")
        seq, wrk, thr = got["sequential"], got["worker"], got["threads"]
        rows.append({"variants": variants, "one lane, s": seq["seconds"], "one lane in a worker thread, s": wrk["seconds"],
                     "threads at once, s": thr["seconds"], "worker / one lane": wrk["seconds"] / seq["seconds"],
                     "threads / one lane": thr["seconds"] / seq["seconds"],
                     "same results": seq["val_accuracy"] == wrk["val_accuracy"] == thr["val_accuracy"],
                     "val_accuracy": seq["val_accuracy"], "val_accuracy_threads": thr["val_accuracy"]})
    print()
    print(table(rows, ["variants", "one lane, s", "one lane in a worker thread, s", "threads at once, s",
                       "worker / one lane", "threads / one lane", "same results"]))
    result = {"machine": info, "params": {k: v for k, v in vars(args).items() if k not in ("side", "workdir")},
              "rows": rows}
    print(f"wrote {write_result('cpu_lanes', result)}")
    return result


if __name__ == "__main__":
    main()
