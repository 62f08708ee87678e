"""What check-data costs on a CIFAR-sized set, and how well it finds planted near-duplicates.

    python -m benchmarks.data_checks [--train 50000] [--val 6500] [--test 3500] [--planted 500]

Generates synthetic CIFAR-format images (cnn.synthetic; CIFAR-10 cannot be downloaded
here), copies `--planted` train images into validation/test, each altered (a shift of
1-2 px with replicated edges, a brightness and contrast change, JPEG re-encoding at
quality 60-95, or all three), and times on this machine's CPU, in the same process:
the baseline (exact duplicates only: a hash of each image's bytes), then every check
(cnn.datachecks.run_checks). Reports the planted pairs found, and the clean
validation/test images flagged, at the run's correlation threshold and at lower ones.
"""
from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Timer, machine, synthetic_images, table, write_result
from cnn import datachecks as dc
from cnn.data import CLASSES, Splits
from cnn.device import prepare_device

KINDS = ("shift", "relit", "jpeg", "shift+relit+jpeg")


def altered(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if "shift" in kind:
        dy, dx = (int(rng.choice([-2, -1, 1, 2])) for _ in range(2))
        t = torch.nn.functional.pad(torch.from_numpy(img)[None].float(), (2, 2, 2, 2), mode="replicate")[0]
        img = t[:, 2 - dy:34 - dy, 2 - dx:34 - dx].byte().numpy()
    if "relit" in kind:
        img = np.clip(img.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-25, 25), 0, 255).astype(np.uint8)
    if "jpeg" in kind:
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
        img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1).copy()
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--val", type=int, default=6_500)
    ap.add_argument("--test", type=int, default=3_500)
    ap.add_argument("--planted", type=int, default=500)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x, y = synthetic_images(args.train + args.val + args.test, seed=0)
    x = x.numpy().copy()
    n_train, n_query = args.train, args.val + args.test
    src = rng.choice(n_train, args.planted, replace=False)
    dst = n_train + rng.choice(n_query, args.planted, replace=False)
    kinds = [KINDS[i % len(KINDS)] for i in range(args.planted)]
    for s, d, kind in zip(src, dst, kinds):
        x[d], y[d] = altered(x[s], kind, rng), y[s]
    x = torch.from_numpy(x)
    v_end = n_train + args.val
    splits = Splits(x[:n_train], y[:n_train], x[n_train:v_end], y[n_train:v_end], x[v_end:], y[v_end:], CLASSES)
    thresholds = dc.Thresholds(class_balance_tolerance=5.0, max_blank_images=0, max_exact_duplicates=100,
                               max_near_duplicates=0.05)
    device = torch.device("cpu")
    prepare_device(device)  # as check-data does

    with Timer() as base:
        dc.exact_duplicates(splits, thresholds.max_exact_duplicates)
    with Timer() as full:
        record, _ = dc.run_checks(splits, thresholds, device)
    parts = {"labels_outside_classes": lambda: dc.labels_outside_classes(splits),
             "class_balance": lambda: dc.class_balance(splits, thresholds.class_balance_tolerance),
             "blank_images": lambda: dc.blank_images(splits, thresholds.max_blank_images)}
    part_seconds = {}
    for name, fn in parts.items():
        with Timer() as t:
            fn()
        part_seconds[name] = round(t.seconds, 2)
    # the near-duplicate step alone, at a lower threshold, to show what the run's threshold buys
    with Timer() as near:
        found = dc.near_duplicates(splits.train_x, x[n_train:], device, correlation=0.98)
    planted = dict(zip((dst - n_train).tolist(), src.tolist()))
    rows = []
    for threshold in (0.98, 0.99, 0.993, dc.NEAR_CORRELATION):
        hit = {q: t for q, t, c in found if c >= threshold}
        found_planted = [hit.get(q) == t for q, t in planted.items()]
        flagged = sum(q not in planted for q in hit)
        rows.append({"correlation_threshold": threshold, "planted_found": f"{sum(found_planted)}/{len(planted)}",
                     "recall": round(float(np.mean(found_planted)), 4),
                     **{f"recall_{k}": round(float(np.mean([f for f, kk in zip(found_planted, kinds) if kk == k])), 4)
                        for k in KINDS},
                     "clean_flagged": flagged, "clean_flagged_fraction": round(flagged / (n_query - len(planted)), 5)})
    timings = [{"what": "baseline: exact duplicates only (hash of bytes)", "seconds": round(base.seconds, 2)},
               {"what": "every check (run_checks)", "seconds": round(full.seconds, 2)},
               {"what": "near-duplicates alone, kept down to correlation 0.98 (the recall table)", "seconds": round(near.seconds, 2)},
               *({"what": f"{name} alone", "seconds": v} for name, v in part_seconds.items())]
    images = n_train + n_query
    print(f"{images:,} images (train {n_train:,}, val {args.val:,}, test {args.test:,}), {args.planted} planted "
          "near-duplicates, CPU")
    print(table(timings, ["what", "seconds"]))
    print(table(rows, list(rows[0])))
    checks = {c["name"]: {k: c[k] for k in ("count", "threshold", "passed")} for c in record["checks"]}
    print(checks)
    write_result("data_checks", {"machine": machine(device), "args": vars(args), "images": images,
                                 "timings": timings, "near_duplicates": rows, "checks": checks,
                                 "run_correlation_threshold": dc.NEAR_CORRELATION})


if __name__ == "__main__":
    main()
