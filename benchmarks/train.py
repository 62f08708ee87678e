"""Seconds per epoch and images/s: our training loop against a plain one, for seed and fast.

    python -m benchmarks.train [--images 5000] [--models seed,fast]

Same device, same run, same synthetic images, same model with the same initial
weights, the recipe's batch size, learning rate and momentum, variant flip-crop:

- ours: cnn.train.train_one_epoch as train() runs it: the uint8 images on the
  device, batches by make_batch, a channels_last model, a host sync every 50
  steps, the recipe's extras (fast: lookahead, alternating flip), and
  cnn.train.prepare_device's process setting (freed memory stays in the heap);
- plain: a torchvision DataLoader with PIL transforms (RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize; num_workers = cores), an fp32 NCHW
  model, plain SGD, `loss.item()` every step;
- plain+heap: the plain loop with ours' heap setting, so the table shows what the
  setting alone is worth;
- ours+bf16: ours with `--precision bf16`, bf16 autocast on the CPU (the product's
  CPU default is fp32; on CUDA it is bf16). Fast only on a CPU with native bf16
  (AVX512-BF16 or AMX); the table's `bf16_native` column says whether this one has it.

Each side runs in its own process, one after another (the heap setting is
process-wide). An epoch here is --images images (default 5,000, a tenth of
CIFAR-10's training set, to keep a CPU run to minutes); the projected column
is 50,000 images at the measured rate. Two warm-up steps are not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.common import Timer, machine, synthetic_images, table, write_result
from benchmarks.loader import PILImages, standard_transform
from cnn.augment import normalize
from cnn.config import make_config
from cnn.device import keep_freed_memory, prepare_device
from cnn.fast import Lookahead
from cnn.train import init_model, make_optimizer, make_scheduler, train_one_epoch

VARIANT = "flip-crop"
WARMUP_STEPS = 2
FULL_EPOCH = 50_000
SIDES = ["plain", "plain+heap", "ours", "ours+bf16"]


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux: its flags name AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _model(name: str, x: torch.Tensor, cfg, device):
    model = init_model(cfg, 10, device)  # channels_last, seeded
    if hasattr(model, "init_from_data"):
        model.init_from_data(normalize(x[:5000].to(device)))
    return model


def run_ours(name: str, x, y, device, precision: str = "fp32") -> dict:
    prepare_device(device)
    cfg = make_config(name, VARIANT, epochs=1, patience=1, seed=0, precision=precision)
    amp = cfg.precision == "bf16"
    model = _model(name, x, cfg, device)
    opt = make_optimizer(model, cfg)
    steps = len(y) // cfg.batch_size
    sched = make_scheduler(opt, cfg, steps + WARMUP_STEPS)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = x.to(device), y.to(device)
    bits = (torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.5).to(device) if cfg.alt_flip else None
    lookahead = Lookahead(model, steps + WARMUP_STEPS) if cfg.lookahead else None
    warm = WARMUP_STEPS * cfg.batch_size
    train_one_epoch(model, opt, sched, x[:warm], y[:warm], cfg, gen, device, amp, 1,
                    None if bits is None else bits[:warm], None)
    with Timer() as t:
        loss = train_one_epoch(model, opt, sched, x, y, cfg, gen, device, amp, 2, bits, lookahead)
    return {"seconds": t.seconds, "images": steps * cfg.batch_size, "batch_size": cfg.batch_size, "loss": loss}


def run_plain(name: str, x, y, device, heap: bool) -> dict:
    if heap:
        keep_freed_memory()
    cfg = make_config(name, VARIANT, epochs=1, patience=1, seed=0)
    model = _model(name, x, cfg, device).to(memory_format=torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    loader = DataLoader(PILImages(x, y, standard_transform()), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=os.cpu_count(), persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))

    def step(xb, yb) -> float:
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device), label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    it = iter(loader)
    for _ in range(WARMUP_STEPS):
        step(*next(it))
    del it
    total, n = 0.0, 0
    with Timer() as t:
        for xb, yb in loader:
            total += step(xb, yb)
            n += len(xb)
    return {"seconds": t.seconds, "images": n, "batch_size": cfg.batch_size, "loss": total / max(1, n // cfg.batch_size)}


def child(args) -> None:
    data = torch.load(args.data, weights_only=True)
    x, y = data["x"][: args.images], data["y"][: args.images]
    device = torch.device("cpu")
    if args.side.startswith("ours"):
        out = run_ours(args.model, x, y, device, precision="bf16" if args.side == "ours+bf16" else "fp32")
    else:
        out = run_plain(args.model, x, y, device, heap=args.side == "plain+heap")
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="images per timed epoch (default 5000)")
    ap.add_argument("--models", default="seed,fast")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        return child(args)

    info = machine()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bf16 = native_bf16()
    print(f"{args.images} synthetic images per epoch, variant {VARIANT}, CPU: {info['cores']} cores "
          f"({info['cpu']}, native bf16: {'yes' if bf16 else 'no'}), torch {info['torch']}; sides run one after "
          "another in their own processes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "images.pt"
        x, y = synthetic_images(args.images + 2048)  # room for the largest warm-up
        torch.save({"x": x, "y": y}, data_path)
        for model in models:
            for side in SIDES:
                cmd = [sys.executable, "-m", "benchmarks.train", "--side", side, "--model", model,
                       "--data", str(data_path), "--images", str(args.images)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rate = r["images"] / r["seconds"]
                rows.append({"model": model, "side": side, "batch_size": r["batch_size"], "images": r["images"],
                             "epoch_s": r["seconds"], "img_per_s": rate, "projected_50k_epoch_s": FULL_EPOCH / rate,
                             "train_loss": r["loss"]})
                print(f"  {model} {side}: {r['seconds']:.1f} s for {r['images']} images ({rate:,.0f} img/s)")
    speedups = {}
    for model in models:
        by = {r["side"]: r for r in rows if r["model"] == model}
        speedups[model] = {"ours_vs_plain": by["ours"]["img_per_s"] / by["plain"]["img_per_s"],
                           "ours_vs_plain_heap": by["ours"]["img_per_s"] / by["plain+heap"]["img_per_s"],
                           "ours_bf16_vs_plain": by["ours+bf16"]["img_per_s"] / by["plain"]["img_per_s"]}
        for r in rows:
            if r["model"] == model:
                r["vs_plain"] = r["img_per_s"] / by["plain"]["img_per_s"]
    print()
    print(table(rows, ["model", "side", "batch_size", "images", "epoch_s", "img_per_s", "projected_50k_epoch_s",
                       "vs_plain"]))
    for model, s in speedups.items():
        print(f"{model}: ours is {s['ours_vs_plain']:.2f}x the plain loop in fp32 ({s['ours_vs_plain_heap']:.2f}x "
              f"with the same heap setting), {s['ours_bf16_vs_plain']:.2f}x with bf16 autocast")
    result = {"machine": {**info, "native_bf16": bf16}, "device": "cpu", "variant": VARIANT,
              "images_per_epoch": args.images,
              "rows": rows, "speedups": speedups}
    print(f"wrote {write_result('train', result)}")
    return result


if __name__ == "__main__":
    main()
