"""This machine's cache ($TRAIN_CIFAR_CACHE) and the two rules that bound it (README,
"Where local space goes"): a run's local copies go once the store holds them (kept
when an upload failed: then they are the only copy); downloaded, prepared and generated
files go when no run has used them for TRAIN_CIFAR_CACHE_DAYS (by modification time,
which each use refreshes).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from store import Store, join_key, safe_name
from store.local import LocalStore
from store.files import beneath

def cache_dir() -> Path:
    """`TRAIN_CIFAR_CACHE` overrides it (a fast local disk on GPU workers)."""
    return Path(os.environ.get("TRAIN_CIFAR_CACHE", Path.home() / ".cache" / "train-cifar")).expanduser()


def local_run_dir(run_id: str, *parts: str) -> Path:
    root = cache_dir() / "runs"
    return beneath(root, root.joinpath(safe_name(run_id, "run id"), *parts), "run_id")


def materialize(store: Store, key: str, filenames: list[str], limits: dict[str, int] | None = None) -> Path:
    """A local folder holding `key/<filename>` for each file: the store's own folder for
    a local store, else a download cache reused across runs. `limits` (name -> bytes)
    refuses a larger file before it is downloaded."""
    inner = getattr(store, "inner", store)  # a PatientStore's own store (store/outage.py)
    if isinstance(inner, LocalStore):
        for name in filenames:
            inner.path_of(f"{key}/{name}")  # no symlink on the way to a file read by path
        return inner.path_of(key)
    root = cache_dir() / "store-cache"
    for name in filenames:
        path = beneath(root, root / join_key(key, name), key)
        if path.is_file():
            os.utime(path)  # the age rule counts from this use
        else:
            store.get_file(f"{key}/{name}", path, limit=(limits or {}).get(name))
    return beneath(root, root / key, key)


DEFAULT_CACHE_DAYS = 14.0  # a weekly or nightly job reuses its data well within this
PRUNED = ("downloads", "prepared", "store-cache", "synthetic", "data-checks")


def cache_days() -> float:
    raw = os.environ.get("TRAIN_CIFAR_CACHE_DAYS", "")
    if not raw.strip():
        return DEFAULT_CACHE_DAYS
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not days >= 0:  # also refuses nan
        raise ValueError(f"TRAIN_CIFAR_CACHE_DAYS: expected a number of days >= 0 (0: keep forever), found {raw!r}")
    return days


def mark_used(path: Path) -> None:
    if path.is_file():
        os.utime(path)
        return
    for folder, _, files in os.walk(path):  # never follows symlinks
        for f in files:
            if not (Path(folder) / f).is_symlink():
                os.utime(Path(folder) / f)


def prune_cache(days: float | None = None) -> list[Path]:
    """Delete cached files unused for `days`; the deleted paths. Symlinks are neither
    followed nor deleted: what they point to is not ours."""
    days = cache_days() if days is None else days
    if days == 0:
        return []
    cutoff = time.time() - days * 86400
    removed = []
    for name in PRUNED:
        top = cache_dir() / name
        if top.is_symlink() or not top.is_dir():
            continue
        for folder, _, files in os.walk(top, topdown=False):
            for f in files:
                p = Path(folder) / f
                if not p.is_symlink() and p.lstat().st_mtime < cutoff:
                    p.unlink(missing_ok=True)
                    removed.append(p)
            if Path(folder) != top:
                try:
                    os.rmdir(folder)  # only if emptied
                except OSError:
                    pass
    return removed


def drop_local_copies(store: Store, run_id: str, *parts: str) -> None:
    """Delete `runs/<run-id>/<parts...>` now that `store` holds it, and the folders it
    left empty; never the store's own folder."""
    run_dir = local_run_dir(run_id)
    path = beneath(run_dir, run_dir.joinpath(*parts), "run_id")
    inner = getattr(store, "inner", store)
    if isinstance(inner, LocalStore) and (path.is_relative_to(inner.root) or inner.root.is_relative_to(path)):
        return
    shutil.rmtree(path, ignore_errors=True)
    root = cache_dir().resolve() / "runs"
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            parent.rmdir()  # only if empty: another variant may still be writing there
        except OSError:
            break
