"""The GPU benchmark: epoch time and images/s for seed and fast, and the six default
variants one after another against sharing the GPU. Sized for at most 5 minutes on
one H200.

    python -m benchmarks.gpu [--images 50000] [--fast-epochs 10] [--seed-epochs 2] [--compile]

On 50,000 synthetic training images (cnn.synthetic; the script needs no
download) and 6,500 validation images:

1. per model, the recipe's batch size, variant flip-crop: one warm-up epoch, then
   the training pass and the validation pass (with the recipe's TTA) timed with
   CUDA events over two epochs; peak memory of one variant;
2. per model, the six default variants trained by cnn.train.train (the real path:
   per-epoch validation, checkpoints, early stopping off) one after another, then
   all at once in threads, each on its own CUDA stream, as many at once as
   cnn.train.variants_that_fit allows; wall-clock time of each, the speed-up, peak
   memory, and every variant's validation accuracy.

`--compile` adds torch.compile to part 1 (its one-off warm-up reported apart).
Without CUDA it stops with a message; `--allow-cpu` runs the same code on the CPU
at whatever size you give (a check of the script, not a benchmark).
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from benchmarks.common import machine, synthetic_images, table, write_result
from cnn.augment import VARIANTS, normalize
from cnn.config import make_config, resolve_precision
from cnn.data import Splits
from cnn.device import prepare_device
from cnn.evaluate import evaluate
from cnn.fast import Lookahead
from cnn.train import (EVAL_BATCH, compile_model, init_model, make_optimizer, make_scheduler, train, train_one_epoch,
                       variants_that_fit)

DEFAULT_VARIANTS = list(VARIANTS)[:6]  # none, flip, crop, flip-crop, flip-crop-cutout, flip-crop-jitter
VAL_IMAGES = 6500


class Clock:
    """Seconds of GPU work between start() and stop(): CUDA events on CUDA, else wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1000
        return time.perf_counter() - self.t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def epoch_timing(name: str, data: Splits, device, use_compile: bool) -> dict:
    """Training and validation pass of one variant, after a warm-up epoch."""
    cfg = make_config(name, "flip-crop", epochs=3, patience=3, seed=0, compile=use_compile,
                      precision=resolve_precision("auto", device))
    amp = cfg.precision == "bf16"
    peak_reset(device)
    model = init_model(cfg, 10, device)
    if hasattr(model, "init_from_data"):
        model.init_from_data(normalize(data.train_x[:5000].to(device)))
    compile_s = None
    fwd = model
    if use_compile:
        sync(device)
        t0 = time.perf_counter()
        fwd = compile_model(model, cfg, device, amp)
        sync(device)
        compile_s = time.perf_counter() - t0
    opt = make_optimizer(model, cfg)
    steps = max(1, len(data.train_y) // cfg.batch_size)  # as train_one_epoch: the ragged batch dropped
    images = min(len(data.train_y), steps * cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = data.train_x.to(device), data.train_y.to(device)
    bits = (torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.5).to(device) if cfg.alt_flip else None
    la = Lookahead(model, cfg.epochs * steps) if cfg.lookahead else None
    clock = Clock(device)
    train_s, val_s = [], []
    for epoch in range(1, 4):  # epoch 1 is the warm-up
        clock.start()
        train_one_epoch(fwd, opt, sched, x, y, cfg, gen, device, amp, epoch, bits, la)
        t = clock.stop()
        clock.start()
        val = evaluate(fwd, data.val_x, data.val_y, device, EVAL_BATCH, tta=cfg.tta, amp=amp, pad_last=True)
        v = clock.stop()
        if epoch > 1:
            train_s.append(t)
            val_s.append(v)
    train_epoch = sum(train_s) / len(train_s)
    val_epoch = sum(val_s) / len(val_s)
    return {"model": name, "compile": use_compile, "batch_size": cfg.batch_size, "train_epoch_s": train_epoch,
            "train_img_per_s": images / train_epoch, "val_epoch_s": val_epoch,
            "val_img_per_s": len(data.val_y) / val_epoch, "tta": cfg.tta, "compile_warmup_s": compile_s,
            "peak_gib": peak_gib(device), "val_accuracy_after_3_epochs": val["accuracy"]}


def variant_runs(name: str, data: Splits, device, epochs: int, workdir: Path) -> dict:
    """The default variants with train(): one after another, then sharing the device."""
    cfgs = [make_config(name, v, epochs=epochs, patience=epochs, seed=0, precision=resolve_precision("auto", device))
            for v in DEFAULT_VARIANTS]
    at_once = variants_that_fit(cfgs[0], device, len(data.train_y), len(cfgs))

    sync(device)
    peak_reset(device)
    t0 = time.perf_counter()
    alone = {c.variant: train(c, data, device, workdir / "alone" / c.variant) for c in cfgs}
    sync(device)
    sequential_s = time.perf_counter() - t0
    sequential_peak = peak_gib(device)

    shared: dict[str, dict] = {}
    errors: list[BaseException] = []
    lanes = [cfgs[i::at_once] for i in range(at_once)]  # a lane trains its variants in turn

    def lane(cs):
        try:
            for c in cs:
                shared[c.variant] = train(c, data, device, workdir / "shared" / c.variant)
        except BaseException as e:  # reported below; one lane's failure must not hang the others
            errors.append(e)

    peak_reset(device)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(cs,)) for cs in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync(device)
    shared_s = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {
        "model": name, "variants": len(cfgs), "epochs": epochs, "at_once": at_once,
        "sequential_s": sequential_s, "shared_s": shared_s, "speedup": sequential_s / shared_s,
        "sequential_peak_gib": sequential_peak, "shared_peak_gib": peak_gib(device),
        "val_accuracy": {v: {"alone": alone[v]["val_accuracy"], "shared": shared[v]["val_accuracy"]}
                         for v in alone},
    }


def make_splits(n_train: int, n_val: int) -> Splits:
    x, y = synthetic_images(n_train + n_val, seed=1)
    return Splits(x[:n_train], y[:n_train], x[n_train:], y[n_train:], x[:0], y[:0], [str(i) for i in range(10)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000, help="training images (default 50000)")
    ap.add_argument("--val-images", type=int, default=VAL_IMAGES)
    ap.add_argument("--models", default="seed,fast")
    ap.add_argument("--fast-epochs", type=int, default=10, help="epochs per variant in part 2 for fast")
    ap.add_argument("--seed-epochs", type=int, default=2, help="epochs per variant in part 2 for seed")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in part 1")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (a check of the script only)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU and none is visible here "
                         "(torch.cuda.is_available() is False). Run it on a GPU node; "
                         "CPU figures come from benchmarks.train and benchmarks.loader.")
    if device.type != "cuda" and not args.allow_cpu:
        raise SystemExit(f"--device {args.device}: this benchmark is for CUDA; add --allow-cpu to check the "
                         "script on the CPU (its figures mean nothing)")
    prepare_device(device)
    info = machine(device)
    started = time.perf_counter()
    data = make_splits(args.images, args.val_images)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"{info.get('gpu', 'cpu')}: {args.images} training and {args.val_images} validation synthetic images")

    timing = []
    for name in models:
        timing.append(epoch_timing(name, data, device, use_compile=False))
        if args.compile:
            timing.append(epoch_timing(name, data, device, use_compile=True))
        print(f"  {name}: {timing[-1]['train_img_per_s']:,.0f} training images/s")
    print()
    print(table(timing, ["model", "compile", "batch_size", "train_epoch_s", "train_img_per_s", "val_epoch_s",
                         "val_img_per_s", "tta", "peak_gib", "compile_warmup_s"]))

    sharing = []
    with TemporaryDirectory() as tmp:
        for name in models:
            epochs = args.fast_epochs if name == "fast" else args.seed_epochs
            sharing.append(variant_runs(name, data, device, epochs, Path(tmp) / name))
            print(f"  {name}: six variants {sharing[-1]['sequential_s']:.1f} s in turn, "
                  f"{sharing[-1]['shared_s']:.1f} s sharing the device")
    print()
    print(table(sharing, ["model", "variants", "epochs", "at_once", "sequential_s", "shared_s", "speedup",
                          "sequential_peak_gib", "shared_peak_gib"]))
    for s in sharing:
        accs = ", ".join(f"{v} {a['alone']:.3f}/{a['shared']:.3f}" for v, a in s["val_accuracy"].items())
        print(f"{s['model']} validation accuracy alone/shared: {accs}")
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    result = {"machine": info, "device": str(device), "images": args.images, "val_images": args.val_images,
              "epoch_timing": timing, "variant_sharing": sharing, "total_s": total}
    if device.type == "cuda":  # a CPU check's figures are not results
        print(f"wrote {write_result('gpu', result)}")
    return result


if __name__ == "__main__":
    main()
