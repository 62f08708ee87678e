"""Classify images with the champion (or a named run's) portable model.

    python -m flows.predict --store s3://bucket/prefix [--run RUN_ID] cat.jpg ship.png

Loads `runs/<run-id>/model/*.pt2` (a torch.export program with the input
normalisation inside) with torch alone, resizes each PNG or JPEG (at most
4096x4096 pixels) to 32x32 RGB and prints one line per image:
`IMAGE<TAB>CLASS<TAB>PROBABILITY`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from store import Store, StoreError, join_key, open_store, safe_name

CHAMPION = "champion.json"  # written by store.champion at the store root
BATCH = 256
FORMATS = ("PNG", "JPEG")
# Every image is shrunk to 32x32, so a larger one gains nothing and costs memory: a
# 20000x20000 PNG of a few kilobytes would decode to 1.2 GB of RGB. Checked from the header.
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def load_image(p: Path) -> torch.Tensor:
    """(3, 32, 32) uint8 RGB of one PNG or JPEG, whatever its size, or a ValueError naming it."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 M pixels; the lower MAX_PIXELS is checked below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p, formats=FORMATS)  # reads the header only; only these decoders are tried
    except FileNotFoundError:
        raise FileNotFoundError(f"IMAGE {p}: no such file") from None
    except UnidentifiedImageError:
        raise ValueError(f"IMAGE {p}: not an image (PNG or JPEG expected)") from None
    except Image.DecompressionBombError:  # Pillow's own limit, twice its warning size
        raise ValueError(f"IMAGE {p}: too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
                         f"at most {MAX_PIXELS:,} ({MAX_SIDE}x{MAX_SIDE}) are accepted") from None
    with im:
        if im.format not in FORMATS:  # what Pillow found in the file, not its extension
            raise ValueError(f"IMAGE {p}: a {im.format} image; PNG or JPEG expected")
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"IMAGE {p}: too large: {w}x{h} pixels; at most {MAX_PIXELS:,} "
                             f"({MAX_SIDE}x{MAX_SIDE}) are accepted")
        try:
            rgb = im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        except (OSError, SyntaxError) as e:  # truncated or damaged after a valid header
            raise ValueError(f"IMAGE {p}: a damaged {im.format} file: {e}") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(paths: list[Path]) -> torch.Tensor:
    """(N, 3, 32, 32) float RGB in 0..1, each image resized to 32x32 whatever its size."""
    return torch.stack([load_image(p) for p in paths]).float() / 255


def model_run(store: Store, run_id: str | None) -> tuple[str, str]:
    """(run id, why this run): the one asked for, else the champion's."""
    if run_id is not None:
        return safe_name(run_id, "--run"), "as asked"
    champ = store.read_json(CHAMPION)
    if champ is None:
        raise LookupError(f"--store {store.uri}: no {CHAMPION}, so no run has been promoted yet; "
                          f"name one with --run RUN_ID ({_runs_hint(store)})")
    return safe_name(champ["run_id"], f"run_id in {store.uri_for(CHAMPION)}"), "the champion"


def _runs_hint(store: Store) -> str:
    runs = sorted({k.split("/")[1] for k in store.list("runs") if k.endswith("/manifest.json")})
    return f"runs in the store: {', '.join(runs[-5:])}" if runs else "the store holds no runs"


def fetch_model(store: Store, run_id: str, workdir: Path) -> tuple[Path, list[str]]:
    """Download the run's portable model and class names; (model path, classes)."""
    folder = join_key("runs", run_id, "model")
    files = store.list(folder)
    portable = [k for k in files if k.endswith(".pt2")]
    if len(portable) != 1:
        if not store.list(join_key("runs", run_id)):
            raise LookupError(f"--run {run_id}: no such run in {store.uri} ({_runs_hint(store)})")
        raise LookupError(f"{store.uri_for(folder)}: expected one portable model (*.pt2), found "
                          f"{', '.join(Path(k).name for k in files) or 'nothing'}; did the run finish?")
    model = store.get_file(portable[0], workdir / Path(portable[0]).name)
    classes = json.loads(store.get_file(join_key(folder, "classes.json"), workdir / "classes.json").read_text())
    return model, classes


def predict(model_path: Path, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, C) from the exported program, with torch alone."""
    module = torch.export.load(str(model_path)).module()  # eval mode was fixed at export
    with torch.no_grad():
        logits = torch.cat([module(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
    return logits.softmax(dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.predict", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="the store the runs are in: a local folder or s3://bucket/prefix")
    ap.add_argument("--run", default=None, metavar="RUN_ID", help="this run's model instead of the champion's")
    ap.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help=f"PNG or JPEG files, up to {MAX_SIDE}x{MAX_SIDE} pixels")
    args = ap.parse_args(argv)
    try:
        images = load_images(args.images)  # bad input fails before anything is downloaded
        store = open_store(args.store, must_exist=True)
        run_id, why = model_run(store, args.run)
        with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
            model_path, classes = fetch_model(store, run_id, Path(tmp))
            print(f"model: run {run_id} ({why}) from {store.uri_for(join_key('runs', run_id, 'model'))}",
                  file=sys.stderr)
            probs = predict(model_path, images)
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
