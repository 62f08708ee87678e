"""A synthetic CIFAR-10-format archive with ten learnable classes.

Each class is a coloured shape over a textured background, drawn at a random
position and scale under noise, so a CNN must learn shape and colour, not
memorise pixels. The archive is byte-for-byte deterministic by seed.

    python -m cnn.synthetic OUT_DIR [--train N] [--test M] [--seed S]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from cnn.data import ARCHIVE_NAME, BATCH_DIR, CLASSES, HOLDOUT_FILE, META_FILE, TRAIN_FILES
from store.files import write_durably

# one (shape, RGB colour) per class; pairs share colour or shape so neither alone suffices
_CLASS_STYLE = [
    ("disc", (220, 60, 60)), ("square", (220, 60, 60)), ("triangle", (60, 200, 80)),
    ("cross", (60, 200, 80)), ("ring", (70, 90, 230)), ("hbars", (70, 90, 230)),
    ("vbars", (230, 200, 50)), ("disc", (230, 200, 50)), ("square", (200, 80, 220)),
    ("ring", (200, 80, 220)),
]


def _shape_mask(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    cy = rng.uniform(10, 22, (n, 1, 1))
    cx = rng.uniform(10, 22, (n, 1, 1))
    r = rng.uniform(5, 9, (n, 1, 1))
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    if shape == "square":
        return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
    if shape == "triangle":
        return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        w = r * 0.3
        return ((np.abs(dy) <= w) | (np.abs(dx) <= w)) & (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "hbars":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r) & ((yy.astype(int) // 3) % 2 == 0)
    if shape == "vbars":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r) & ((xx.astype(int) // 3) % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def make_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 images in CIFAR's channel-major layout and their labels."""
    labels = rng.integers(0, 10, n)
    bg = rng.uniform(20, 120, (n, 3, 1, 1))
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    freq = rng.uniform(0.1, 0.5, (n, 1, 1, 1))
    phase = rng.uniform(0, 6.3, (n, 1, 1, 1))
    texture = 25 * np.sin(freq * (xx + yy) + phase)
    img = np.broadcast_to(bg + texture, (n, 3, 32, 32)).copy()
    for c, (shape, colour) in enumerate(_CLASS_STYLE):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        mask = _shape_mask(shape, len(idx), rng)[:, None]
        tint = np.asarray(colour, np.float32)[None, :, None, None] * rng.uniform(0.7, 1.1, (len(idx), 1, 1, 1))
        img[idx] = np.where(mask, tint, img[idx])
    img += rng.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_archive(out_dir: Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> tuple[Path, str]:
    if n_train < len(TRAIN_FILES) or n_test < 2:
        raise ValueError(f"--train must be >= {len(TRAIN_FILES)} and --test >= 2, found {n_train} and {n_test}")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ARCHIVE_NAME
    buf = io.BytesIO()
    # mtime=0 in the gzip header and every tar member: same seed, same bytes
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        per_batch = np.array_split(np.arange(n_train), len(TRAIN_FILES))
        for name, idx in zip(TRAIN_FILES, per_batch):
            data, labels = make_images(len(idx), rng)
            _add(tar, name, pickle.dumps({"batch_label": name, "data": data, "labels": labels}, protocol=2))
        data, labels = make_images(n_test, rng)
        _add(tar, HOLDOUT_FILE, pickle.dumps({"batch_label": HOLDOUT_FILE, "data": data, "labels": labels}, protocol=2))
        _add(tar, META_FILE, pickle.dumps({"label_names": CLASSES, "num_cases_per_batch": n_train // 5}, protocol=2))
    write_durably(path, buf.getvalue())
    return path, hashlib.md5(buf.getvalue()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cnn.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    ap.add_argument("--test", type=int, default=1000, help="hold-out images (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path, md5 = write_archive(args.out_dir, args.train, args.test, args.seed)
    except ValueError as e:
        ap.error(str(e))
    print(f"{path}  md5 {md5}")


if __name__ == "__main__":
    main()
