"""Successive halving against the full grid: device time, and whether both select the same variant.

    python -m benchmarks.halving [--seeds 10] [--variants none,flip,...] [--repeats 2] [--epochs 9]
                                 [--rungs 1:3,2:3,3:3] [--train 1000] [--holdout 1000] [--widths 16,16,32,32,32,32]
                                 [--out halving]
    python -m benchmarks.halving --replay RESULTS.json [MORE.json ...] [--rungs ...] [--out NAME]

For each of `seeds` training seeds, trains the full grid (every variant x repeat to the
last epoch, the training loop the flow runs, on this machine's CPU; synthetic
CIFAR-format data: CIFAR-10 cannot be downloaded here) and keeps each epoch's validation
loss, accuracy and seconds. Halving is then replayed on those epochs with the rule the
flow uses (cnn/halving.py): a unit halving stops has run exactly the epochs up to its rung,
and one that goes on resumes from its checkpoint and trains the epochs the full grid did
(tests/test_halving.py checks that the survivors' results are the full grid's, exactly).
Its device time is the sum of the epochs it would run; the full grid's, all of them.
Every (first rung, factor) in `--rungs` is replayed on the same trainings. `gap` is how
far (in points of mean validation accuracy at the last epoch) halving's pick is behind the
full grid's: 0 when they agree. Every epoch's figures are kept in the results file, so
other settings can be replayed without training again. Two processes can share the cores
by training different `--variants` with the same other arguments (each with its own
`--out`); `--replay A.json B.json --out NAME` joins their trainings, seed by seed, and
writes the joined figures.

`--widths`: the seed network's channel widths (the same architecture and recipe); the
default is narrower than the product's so that 10 seeds of a 6 x 2 grid fit in minutes on
a CPU. Both sides of every comparison train the same network.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, table, write_result
from cnn.config import make_config
from cnn.data import load_splits, prepare
from cnn.halving import decide, rungs
from cnn.models import MODELS, RECIPES, SeedNet
from cnn.stats import Comparison
from cnn.synthetic import write_archive
from cnn.train import train

VARIANTS = "none,flip,crop,flip-crop,flip-crop-cutout,flip-crop-jitter"


def best_so_far(history: list[dict], epoch: int) -> tuple[float, float]:
    """(val_accuracy, val_loss) of the best epoch by validation loss up to `epoch`, as the loop keeps it."""
    best = min((r for r in history if r["epoch"] <= epoch), key=lambda r: r["val_loss"])
    return best["val_accuracy"], best["val_loss"]


def mean_accuracy(histories: dict[str, list[list[dict]]], v: str, epoch: int) -> float:
    return sum(best_so_far(h, epoch)[0] for h in histories[v]) / len(histories[v])


def select(histories: dict[str, list[list[dict]]], epoch: int, among: list[str]) -> str:
    """The variant with the highest mean (over repeats) best validation accuracy at `epoch`; ties: lower mean loss."""
    def key(v):
        pairs = [best_so_far(h, epoch) for h in histories[v]]
        return (-sum(a for a, _ in pairs) / len(pairs), sum(loss for _, loss in pairs) / len(pairs))
    return min(among, key=key)


def noise(kept: list[dict[str, list[list[dict]]]], epochs: int) -> dict:
    """How stable the full grid's own choice is on these trainings: every seed trained the same data
    and splits, so two seeds' grids are two nights of the same job. `agree` counts the pairs of
    seeds whose grids select the same variant; `spread` is each variant's mean and standard
    deviation (points of validation accuracy at the last epoch, over seeds and repeats). When two
    nights rarely agree, the full grid's pick is mostly which training the noise favoured."""
    picks = [select(h, epochs, list(h)) for h in kept]
    spread = {}
    for v in kept[0]:
        accs = [100 * best_so_far(h, epochs)[0] for hs in kept for h in hs[v]]
        spread[v] = {"mean": round(statistics.mean(accs), 1), "sd": round(statistics.stdev(accs), 1),
                     "selected": picks.count(v)}
    pairs = list(itertools.combinations(picks, 2))
    return {"agree": sum(a == b for a, b in pairs), "pairs": len(pairs), "spread": spread}


def join(results: list[dict]) -> dict:
    """One results file from several that trained different variants with the same seeds and settings."""
    first = results[0]
    same = ("epochs", "repeats", "train", "holdout", "widths")
    for other in results[1:]:
        differs = {k: (first["args"][k], other["args"][k]) for k in same if first["args"][k] != other["args"][k]}
        if differs or len(other["histories"]) != len(first["histories"]):
            raise SystemExit(f"--replay: the files must share {same} and their seeds; found {differs or 'other seeds'}")
    histories = [{} for _ in first["histories"]]
    for r in results:
        for joined, seed in zip(histories, r["histories"]):
            if set(joined) & set(seed):
                raise SystemExit(f"--replay: variants trained twice: {sorted(set(joined) & set(seed))}")
            joined.update(seed)
    return {**first, "args": {**first["args"], "variants": ",".join(histories[0])}, "histories": histories,
            "joined": [",".join(r["histories"][0]) for r in results]}


def replay(histories: dict[str, list[list[dict]]], epochs: int, min_epochs: int, factor: int) -> tuple[str, float, dict]:
    """(halving's selection, its device seconds, epochs each variant ran)."""
    live = list(histories)
    ran = {v: epochs for v in histories}
    no_interval = lambda a, b: Comparison(0.0, (0.0, 0.0), False, "replay: not computed", 0.95, 0)  # noqa: E731
    for k, e in enumerate(rungs(min_epochs, factor, epochs), 1):
        scores = {v: mean_accuracy(histories, v, e) for v in live}
        live, stops = decide(k, e, scores, factor, no_interval)
        for s in stops:
            ran[s.variant] = e
    seconds = sum(r["seconds"] for v, hs in histories.items() for h in hs for r in h if r["epoch"] <= ran[v])
    return select(histories, epochs, live), seconds, ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--rungs", default="1:3,2:3,3:3", help="first rung:factor settings to replay")
    ap.add_argument("--replay", type=Path, nargs="+",
                    help="results files of this benchmark: replay their trainings (joined, if several), train nothing")
    ap.add_argument("--out", help="the results file's name under benchmarks/results (default: halving); "
                                  "a replay writes one only when given")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--widths", default="16,16,32,32,32,32")
    args = ap.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    MODELS["bench"] = lambda num_classes=10: SeedNet(widths, 2 * widths[-1], num_classes)
    RECIPES["bench"] = RECIPES["seed"]
    variants = args.variants.split(",")
    settings = [tuple(int(x) for x in pair.split(":")) for pair in args.rungs.split(",")]
    rows, kept = [], []
    earlier = join([json.loads(p.read_text()) for p in args.replay]) if args.replay else None
    if earlier:
        args.epochs, args.seeds = earlier["args"]["epochs"], len(earlier["histories"])
        variants = list(earlier["histories"][0])
    with tempfile.TemporaryDirectory(prefix="bench-halving-") as tmp:
        if not earlier:
            archive, md5 = write_archive(Path(tmp) / "data", n_train=args.train, n_test=args.holdout, seed=0)
            data = load_splits(prepare(archive, md5, Path(tmp) / "prepared"), split_seed=0)
        for seed in range(args.seeds):
            histories: dict[str, list[list[dict]]] = earlier["histories"][seed] if earlier else {v: [] for v in variants}
            for v in variants if not earlier else []:
                for r in range(args.repeats):
                    cfg = make_config("bench", v, epochs=args.epochs, patience=args.epochs, seed=100 * seed + r)
                    out = train(cfg, data, torch.device("cpu"), Path(tmp) / f"{seed}-{v}-{r}")
                    histories[v].append([{k: row[k] for k in ("epoch", "val_loss", "val_accuracy", "seconds")}
                                         for row in out["history"]])
            kept.append(histories)
            full = select(histories, args.epochs, variants)
            full_s = sum(row["seconds"] for hs in histories.values() for h in hs for row in h)
            for r, eta in settings:
                halved, halved_s, ran = replay(histories, args.epochs, r, eta)
                gap = 100 * (mean_accuracy(histories, full, args.epochs) - mean_accuracy(histories, halved, args.epochs))
                rows.append({"seed": seed, "rungs": f"{r}x{eta}", "full_grid": full, "halving": halved,
                             "same": full == halved, "gap": gap, "full_s": full_s, "halving_s": halved_s,
                             "saving": full_s / halved_s, "epochs_run": sum(ran[v] for v in variants) * args.repeats})
            print(table(rows[-len(settings):], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    summary = []
    for r, eta in settings:
        mine = [row for row in rows if row["rungs"] == f"{r}x{eta}"]
        full_total, halved_total = sum(x["full_s"] for x in mine), sum(x["halving_s"] for x in mine)
        summary.append({"rungs": f"{r}x{eta}", "at_epochs": ",".join(map(str, rungs(r, eta, args.epochs))),
                        "same": f"{sum(x['same'] for x in mine)} of {len(mine)}",
                        "mean_gap": sum(x["gap"] for x in mine) / len(mine), "max_gap": max(x["gap"] for x in mine),
                        "full_s": full_total, "halving_s": halved_total, "saving": full_total / halved_total})
    print()
    print(table(summary, list(summary[0])))
    stability = noise(kept, args.epochs)
    print(f"\nthe full grid against itself: two seeds' grids select the same variant in "
          f"{stability['agree']} of {stability['pairs']} pairs")
    print(table([{"variant": v, **x} for v, x in stability["spread"].items()], ["variant", "mean", "sd", "selected"]))
    if earlier and not args.out:  # a replay writes nothing over the trainings it read
        return
    how = ({"machine": earlier["machine"], "args": earlier["args"], "joined_from": earlier["joined"]}
           if earlier else {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "replay"}})
    write_result(args.out or "halving", {**how, "summary": summary, "noise": stability,
                             "rows": rows, "histories": kept})

if __name__ == "__main__":
    main()
