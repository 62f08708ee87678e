"""What the flow adds: a small synthetic run through the train-cifar flow against the
same training called directly.

    python -m benchmarks.orchestration [--variants none,flip] [--epochs 3]

Both sides run as fresh processes on the same machine, one after the other, and
do the same work from nothing: generate the synthetic archive (5,000 training,
1,000 hold-out images), prepare it, train the variants at once in threads (as the
flow does on a CPU), select by validation accuracy, test the selected model once.

- direct: cnn/ called from a plain script (this module with --direct);
- flow: `python -m flows.train_cifar --dataset synthetic ...` on embedded Prefect
  (an ephemeral API server), with everything the flow does on top: tasks, the
  store (a local folder), checkpoints and history uploaded every epoch, UI
  artifacts, the portable export, the manifest. Run twice: `cold` with a new
  Prefect home (its database created first), `warm` reusing it, the usual case;
- empty flow: a flow that does nothing, on the same Prefect home: the fixed cost
  of importing Prefect and starting its temporary server.

The overhead is flow minus direct wall-clock time; both should select the same
variant with the same test accuracy (same seeds, same code).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import machine, table, write_result

REPO = Path(__file__).resolve().parent.parent
EMPTY_FLOW = "from prefect import flow\n@flow(name='empty')\ndef empty():\n    return 1\nempty()"


def direct(args) -> None:
    """The same work as the flow, with no orchestration: prints one JSON line."""
    import torch

    from cnn.data import load_splits, prepare
    from cnn.evaluate import evaluate
    from cnn.models import build_model
    from cnn.synthetic import write_archive
    from cnn.train import make_config, train

    work = Path(args.workdir)
    path, md5 = write_archive(work / "synthetic", args.synthetic_train, args.synthetic_test, seed=0)
    data = load_splits(prepare(path, md5, work / "prepared"), split_seed=0, subset=args.subset)
    cpu = torch.device("cpu")
    cfgs = {v: make_config(args.model, v, epochs=args.epochs, patience=args.patience, seed=0)
            for v in args.variants.split(",")}
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda v=v: results.__setitem__(v, train(cfgs[v], data, cpu, work / v)))
               for v in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [v for v in cfgs if results[v]["status"] in ("completed", "early_stopped")]
    best = max(ok, key=lambda v: (results[v]["val_accuracy"], -results[v]["val_loss"]))
    model = build_model(args.model, num_classes=len(data.classes))
    model.load_state_dict(results[best]["best_state"])
    test = evaluate(model.to(memory_format=torch.channels_last), data.test_x, data.test_y, cpu, tta=cfgs[best].tta)
    print(json.dumps({"selected": best, "test_accuracy": test["accuracy"]}))


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="seed")
    ap.add_argument("--variants", default="none,flip")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--synthetic-train", type=int, default=5000)
    ap.add_argument("--synthetic-test", type=int, default=1000)
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # internal: the direct side
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.direct:
        return direct(args)

    info = machine()
    common = ["--model", args.model, "--variants", args.variants, "--epochs", str(args.epochs),
              "--patience", str(args.patience), "--synthetic-train", str(args.synthetic_train),
              "--synthetic-test", str(args.synthetic_test)] + (["--subset", str(args.subset)] if args.subset else [])
    print(f"{args.model}, variants {args.variants}, {args.epochs} epochs, synthetic {args.synthetic_train}/"
          f"{args.synthetic_test} images; CPU: {info['cores']} cores ({info['cpu']})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        seconds, out = timed([sys.executable, "-m", "benchmarks.orchestration", "--direct", "--workdir",
                              str(tmp / "direct"), *common], env)
        r = json.loads(out.strip().splitlines()[-1])
        rows.append({"side": "direct", "seconds": seconds, **r})
        print(f"  direct: {seconds:.1f} s")
        prefect_home = tmp / "prefect-home"
        for side in ("flow (cold)", "flow (warm)"):
            run = tmp / side.split()[1].strip("()")
            flow_env = {**env, "PREFECT_HOME": str(prefect_home), "TRAIN_CIFAR_CACHE": str(run / "cache"),
                        "PREFECT_LOGGING_LEVEL": "WARNING"}
            seconds, out = timed([sys.executable, "-m", "flows.train_cifar", "--dataset", "synthetic",
                                  "--store", str(run / "store"), "--device", "cpu", *common], flow_env)
            manifest = json.loads(Path(out.strip().splitlines()[-1]).read_text())
            rows.append({"side": side, "seconds": seconds, "selected": manifest["selected"],
                         "test_accuracy": manifest["test"]["accuracy"]})
            print(f"  {side}: {seconds:.1f} s")
        # the fixed cost alone: import Prefect, start the temporary server, run an empty flow
        seconds, _ = timed([sys.executable, "-c", EMPTY_FLOW], {**env, "PREFECT_HOME": str(prefect_home),
                                                                "PREFECT_LOGGING_LEVEL": "WARNING"})
        rows.append({"side": "empty flow (warm)", "seconds": seconds})
        print(f"  empty flow: {seconds:.1f} s")
    base = rows[0]["seconds"]
    for r in rows[:3]:
        r["added_s"] = r["seconds"] - base
        r["added_pct"] = 100 * (r["seconds"] - base) / base
    print()
    print(table(rows, ["side", "seconds", "added_s", "added_pct", "selected", "test_accuracy"]))
    warm = rows[2]
    empty = rows[3]["seconds"]
    print(f"\nthe flow adds {warm['added_s']:.1f} s ({warm['added_pct']:.1f}%) to a {base:.0f} s run "
          f"({rows[1]['added_s']:.1f} s with a new Prefect home); an empty flow alone takes {empty:.1f} s "
          "(Prefect's import and temporary server), a fixed cost that does not grow with the run")
    result = {"machine": info, "params": {k: v for k, v in vars(args).items() if k not in ("direct", "workdir")},
              "rows": rows}
    print(f"wrote {write_result('orchestration', result)}")
    return result


if __name__ == "__main__":
    main()
