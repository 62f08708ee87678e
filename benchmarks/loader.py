"""Images per second: our on-device batch pipeline against a torchvision DataLoader.

    python -m benchmarks.loader [--images 50000] [--batch-size 512] [--epochs 3]

Both sides turn the same uint8 images into shuffled, augmented, normalised float
batches, in the same run on the same machine:

- ours: cnn.augment.make_batch on the training device (here the CPU): the
  dataset stays a uint8 tensor, each batch is one gather plus a few tensor ops;
- the DataLoader baseline: PIL transforms per image, `num_workers` = cores, the
  standard CIFAR-10 recipe RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize. The headline is ours (flip-crop) against it;
- matched: for each variant, a DataLoader doing the same augmentations with PIL
  (reflect padding like ours; RandomErasing of an 8x8 square for cutout,
  ColorJitter(0.3, 0.3, 0.3) for jitter).

Both run under training's CPU setting (cnn.train.prepare_device: freed memory
stays in the process heap). Throughput is images per second over whole epochs (ours: median of --epochs;
DataLoader: one epoch, timed after its first 4 batches so worker start-up is not
counted).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import Timer, machine, synthetic_images, table, write_result
from cnn.augment import MEAN, STD, VARIANTS, make_batch
from cnn.device import prepare_device

SKIP = 4  # DataLoader batches before the clock starts (worker start-up)


class PILImages(Dataset):
    """HWC uint8 images through a torchvision transform, one PIL image at a time."""

    def __init__(self, x_u8: torch.Tensor, y: torch.Tensor, transform):
        self.images = x_u8.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3)
        self.labels = y.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def standard_transform():
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def matched_transform(variant: str):
    pil = []
    if "flip" in variant:
        pil.append(T.RandomHorizontalFlip())
    if "crop" in variant:
        pil.append(T.RandomCrop(32, padding=4, padding_mode="reflect"))
    if "jitter" in variant:
        pil.append(T.ColorJitter(0.3, 0.3, 0.3))
    tensor = [T.ToTensor(), T.Normalize(MEAN, STD)]
    if "cutout" in variant:
        tensor.append(T.RandomErasing(p=1.0, scale=(64 / 1024, 64 / 1024), ratio=(1.0, 1.0), value=0))
    return T.Compose(pil + tensor)


def dataloader_rate(x_u8, y, transform, batch_size: int, workers: int) -> float:
    """Images/s of one DataLoader epoch, after its first SKIP batches."""
    loader = DataLoader(PILImages(x_u8, y, transform), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, generator=torch.Generator().manual_seed(0))
    n = 0
    it = iter(loader)
    for _ in range(SKIP):
        next(it)
    with Timer() as t:
        for xb, yb in it:
            n += len(xb)
    return n / t.seconds


def ours_rate(x_u8, variant: str, batch_size: int, epochs: int) -> float:
    """Images/s of make_batch over whole epochs (median), shuffled per epoch like training."""
    g = torch.Generator().manual_seed(0)
    steps = len(x_u8) // batch_size
    make_batch(x_u8, torch.arange(batch_size), variant, g)  # warm-up
    rates = []
    for _ in range(epochs):
        with Timer() as t:
            perm = torch.randperm(len(x_u8), generator=g)
            for i in range(steps):
                make_batch(x_u8, perm[i * batch_size : (i + 1) * batch_size], variant, g)
        rates.append(steps * batch_size / t.seconds)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of ours per variant (the median counts)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: cores)")
    ap.add_argument("--no-matched", action="store_true", help="skip the per-variant PIL pipelines")
    args = ap.parse_args(argv)

    info = machine()
    # training's process setting (freed memory stays in the heap), for both sides: the
    # DataLoader's workers fork from this process and its collated batches gain from it too
    prepare_device(torch.device("cpu"))
    x, y = synthetic_images(args.images)
    print(f"{args.images} synthetic images, batch {args.batch_size}, {args.workers} DataLoader workers, "
          f"{info['cores']} cores ({info['cpu']}), torch {info['torch']}")
    baseline = dataloader_rate(x, y, standard_transform(), args.batch_size, args.workers)
    rows = []
    for variant in VARIANTS:
        ours = ours_rate(x, variant, args.batch_size, args.epochs)
        matched = None if args.no_matched else dataloader_rate(x, y, matched_transform(variant), args.batch_size,
                                                               args.workers)
        rows.append({"variant": variant, "ours_img_per_s": ours, "vs_standard_dataloader": ours / baseline,
                     "matched_dataloader_img_per_s": matched,
                     "vs_matched_dataloader": None if matched is None else ours / matched})
        print(f"  {variant}: ours {ours:,.0f} img/s" + ("" if matched is None else f", matched PIL {matched:,.0f}"))
    headline = next(r for r in rows if r["variant"] == "flip-crop")["vs_standard_dataloader"]

    print()
    print(f"standard DataLoader (RandomCrop(32, padding=4), flip, ToTensor, Normalize; {args.workers} workers): "
          f"{baseline:,.0f} img/s")
    print(table(rows, ["variant", "ours_img_per_s", "vs_standard_dataloader", "matched_dataloader_img_per_s",
                       "vs_matched_dataloader"]))
    print(f"\nheadline: ours (flip-crop) is {headline:.1f}x the standard DataLoader")
    result = {"machine": info, "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
              "device": "cpu", "standard_dataloader_img_per_s": baseline, "headline_ratio": headline,
              "variants": rows}
    print(f"wrote {write_result('loader', result)}")
    return result


if __name__ == "__main__":
    main()
