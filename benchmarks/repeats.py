"""How sure the decisions are with 1, 2 and 4 repeats, and what a repeat costs.

    python -m benchmarks.repeats [--variants flip,flip-crop] [--seeds 4] [--epochs 8] [--train 3000] [--holdout 2000]

Trains each variant with seeds 0..seeds-1 (the training loop the flow runs, on this
machine's CPU, synthetic CIFAR-format data: CIFAR-10 cannot be downloaded here),
keeps every repeat's best-epoch predictions on the validation images, and then,
for 1, 2 and 4 repeats (the first seeds), reports the width of each variant's 95%
interval and of the interval of their paired difference (cnn.stats), and whether
the difference is distinguishable. A repeat costs one more training of the
variant: its seconds are the figure, since repeats are independent units of work
(lanes or fan-out children), so with spare GPUs they add no wall time.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, table, write_result
from cnn.config import make_config
from cnn.data import load_splits, prepare
from cnn.stats import paired_difference, variant_interval
from cnn.synthetic import write_archive
from cnn.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="flip,flip-crop")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--holdout", type=int, default=2000)
    args = ap.parse_args()
    variants = args.variants.split(",")
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-repeats-") as tmp:
        archive, md5 = write_archive(Path(tmp) / "data", n_train=args.train, n_test=args.holdout, seed=0)
        data = load_splits(prepare(archive, md5, Path(tmp) / "prepared"), split_seed=0)
        correct: dict[str, list[np.ndarray]] = {v: [] for v in variants}
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:
            for seed in range(args.seeds):
                cfg = make_config("seed", v, epochs=args.epochs, patience=args.epochs, seed=seed)
                out = train(cfg, data, device, Path(tmp) / f"{v}-{seed}")
                correct[v].append((out["best_predictions"].long() == data.val_y).numpy())
                seconds[v].append(out["seconds"])
                print(f"{v} seed {seed}: val_acc {out['val_accuracy']:.4f} in {out['seconds']:.1f}s", flush=True)
    rows = []
    for r in (1, 2, 4):
        if r > args.seeds:
            break
        row = {"repeats": r}
        for v in variants:
            mean, low, high = variant_interval(np.stack(correct[v][:r]))
            row[f"{v}_acc"] = round(100 * mean, 2)
            row[f"{v}_width_pts"] = round(100 * (high - low), 2)
        a, b = variants[:2]
        c = paired_difference(np.stack(correct[a][:r]), np.stack(correct[b][:r]))
        row.update(diff_pts=round(100 * c.difference, 2), diff_width_pts=round(100 * (c.ci[1] - c.ci[0]), 2),
                   distinguishable=c.distinguishable)
        rows.append(row)
    per_repeat = {v: round(float(np.mean(s)), 1) for v, s in seconds.items()}
    print(table(rows, list(rows[0])))
    print(f"seconds per repeat (training, {len(data.train_y)} images x {args.epochs} epochs): {per_repeat}")
    write_result("repeats", {"machine": machine(device), "args": vars(args), "val_images": len(data.val_y),
                             "rows": rows, "seconds_per_repeat": per_repeat})


if __name__ == "__main__":
    main()
