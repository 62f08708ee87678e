"""Classify images with the champion (or a named run's) portable model.

    python -m flows.predict --store s3://bucket/prefix [--run RUN_ID] cat.jpg ship.png

Loads `runs/<run-id>/model/*.pt2` (a torch.export program with the input
normalisation inside) with torch alone, resizes each PNG or JPEG to 32x32 RGB
and prints one line per image: `IMAGE<TAB>CLASS<TAB>PROBABILITY`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from store import Store, StoreError, join_key, open_store, safe_name

CHAMPION = "champion.json"  # written by store.champion at the store root
BATCH = 256


def load_images(paths: list[Path]) -> torch.Tensor:
    """(N, 3, 32, 32) float RGB in 0..1, each image resized to 32x32 whatever its size."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        except FileNotFoundError:
            raise FileNotFoundError(f"IMAGE {p}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"IMAGE {p}: not an image PIL can read (expected PNG or JPEG): {e}") from None
        out.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


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
    ap.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files, any size")
    args = ap.parse_args(argv)
    try:
        images = load_images(args.images)  # bad input fails before anything is downloaded
        store = open_store(args.store)
        if not args.store.startswith("s3://") and not Path(args.store).expanduser().is_dir():
            raise FileNotFoundError(f"--store {args.store}: no such folder")
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
