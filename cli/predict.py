"""Classify images with a champion's (or a named run's) model.

    python -m cli.predict --store s3://bucket/prefix [--dataset IDENTITY | --run RUN_ID] cat.jpg ship.png

Rebuilds the run's model from `runs/<run-id>/model/weights.safetensors` and
`config.json` (nothing unpickled; `--portable` loads the `.pt2` instead, once its
SHA-256 matches the manifest and its archive holds nothing that could unpickle more
than tensors: run/model.py), resizes each PNG or JPEG (at
most 4096x4096 pixels) to 32x32 RGB and prints one line per image:
`IMAGE<TAB>CLASS<TAB>PROBABILITY`.

Without --run, the champion of: --dataset, else the official CIFAR-10 archive's
identity if it has one champion, else the store's only champion.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnn.data import ARCHIVE_MD5
from run.model import load_model, runs_hint
from run.layout import model_key
from store import Store, StoreError, open_store, safe_name
from registry import champions

BATCH = 256
FORMATS = ("PNG", "JPEG")
# Every image is shrunk to 32x32, so a larger one gains nothing and costs memory: a
# 20000x20000 PNG of a few kilobytes would decode to 1.2 GB of RGB. Checked from the header.
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def load_image(p: Path) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 M pixels; the lower MAX_PIXELS is checked below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p, formats=FORMATS)  # the header only
    except FileNotFoundError:
        raise FileNotFoundError(f"IMAGE {p}: no such file") from None
    except UnidentifiedImageError:
        raise ValueError(f"IMAGE {p}: not an image (PNG or JPEG expected)") from None
    except Image.DecompressionBombError:  # Pillow's own limit, twice its warning size
        raise ValueError(f"IMAGE {p}: too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
                         f"at most {MAX_PIXELS:,} ({MAX_SIDE}x{MAX_SIDE}) are accepted") from None
    except ValueError as e:  # e.g. a PNG text chunk that inflates past Pillow's limit (a bomb of its own)
        raise ValueError(f"IMAGE {p}: refused while reading its header: {e}") from None
    with im:
        if im.format not in FORMATS:  # what Pillow found in the file, not its extension
            raise ValueError(f"IMAGE {p}: a {im.format} image; PNG or JPEG expected")
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"IMAGE {p}: too large: {w}x{h} pixels; at most {MAX_PIXELS:,} "
                             f"({MAX_SIDE}x{MAX_SIDE}) are accepted")
        try:
            rgb = im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        except (OSError, SyntaxError, ValueError) as e:  # damaged after a valid header, or a text-chunk bomb
            raise ValueError(f"IMAGE {p}: a damaged {im.format} file: {e}") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(paths: list[Path]) -> torch.Tensor:
    return torch.stack([load_image(p) for p in paths]).float() / 255


def model_run(store: Store, run_id: str | None, dataset: str | None) -> tuple[str, str]:
    """(run id, why this run): the one asked for, else a champion's (see the module's doc)."""
    if run_id is not None:
        return safe_name(run_id, "--run"), "as asked"
    docs = champions.documents(store)
    if dataset is not None:
        if dataset not in docs:
            raise LookupError(f"--dataset {dataset}: no champion of that dataset identity in {store.uri} "
                              f"({_identities(docs)})")
        chosen = dataset
    elif not docs:
        raise LookupError(f"--store {store.uri}: no champion yet, so no run has been promoted; "
                          f"name one with --run RUN_ID ({runs_hint(store)})")
    else:
        official = [i for i, d in docs.items() if d["champion"].get("dataset_md5") == ARCHIVE_MD5]
        chosen = official[0] if len(official) == 1 else next(iter(docs)) if len(docs) == 1 else None
        if chosen is None:
            raise LookupError(f"--store {store.uri}: champions of {len(docs)} datasets; choose one with "
                              f"--dataset IDENTITY or a run with --run RUN_ID ({_identities(docs)})")
    run = docs[chosen]["champion"]["run_id"]
    return safe_name(run, f"run_id in {store.uri_for(champions.key_for(chosen))}"), f"the champion of {chosen}"


def _identities(docs: dict) -> str:
    return f"identities with a champion: {', '.join(docs)}" if docs else "no dataset has a champion yet"


def predict(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, C): `module` takes 0..1 RGB and normalises inside."""
    with torch.no_grad():
        logits = torch.cat([module(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
    return logits.softmax(dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cli.predict", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="the store the runs are in: a local folder or s3://bucket/prefix")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--run", default=None, metavar="RUN_ID", help="this run's model instead of a champion's")
    pick.add_argument("--dataset", default=None, metavar="IDENTITY",
                      help="the champion of this dataset identity (python -m cli.champion --store S lists them)")
    ap.add_argument("--portable", action="store_true",
                    help="load the portable model.pt2 (after checking its SHA-256 against the run's manifest and "
                         "refusing any archive that could unpickle more than tensors) "
                         "instead of rebuilding the model from weights.safetensors")
    ap.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help=f"PNG or JPEG files, up to {MAX_SIDE}x{MAX_SIDE} pixels")
    args = ap.parse_args(argv)
    try:
        images = load_images(args.images)  # before anything is downloaded
        store = open_store(args.store, must_exist=True)
        run_id, why = model_run(store, args.run, args.dataset)
        with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
            module, classes = load_model(store, run_id, Path(tmp), portable=args.portable)
            what = "model.pt2, SHA-256 and contents checked" if args.portable else "weights.safetensors"
            print(f"model: run {run_id} ({why}) from {store.uri_for(model_key(run_id))} ({what})",
                  file=sys.stderr)
            probs = predict(module, images)
    except (OSError, ValueError, LookupError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if probs.shape[1] != len(classes):
        print(f"error: the model gives {probs.shape[1]} scores but classes.json names {len(classes)} classes",
              file=sys.stderr)
        return 1
    conf, idx = probs.max(dim=1)
    for path, i, p in zip(args.images, idx.tolist(), conf.tolist()):
        print(f"{path}\t{classes[i]}\t{p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
