"""This machine's cache stays bounded (run/cache.py): a run's local copies go once the
store holds them; downloads and prepared data unused for TRAIN_CIFAR_CACHE_DAYS go."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from store import LocalStore, open_store
from run.cache import drop_local_copies, prune_cache
from run.cache import local_run_dir
from tests.contexts import run_context

DAY = 86400


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRAIN_CIFAR_CACHE_DAYS", raising=False)
    return tmp_path / "cache"


def _file(path: Path, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    t = time.time() - age_days * DAY
    os.utime(path, (t, t))
    return path


def test_unused_cached_files_are_pruned_by_age(cache, tmp_path, monkeypatch):
    old = [_file(cache / "downloads" / "b" / "m" / "a.tar.gz", 20),
           _file(cache / "prepared" / "cifar10" / "abc" / "meta.json", 15),
           _file(cache / "store-cache" / "datasets" / "x" / "m" / "prepared.safetensors", 30)]
    fresh = [_file(cache / "synthetic" / "train10-test10" / "cifar-10-python.tar.gz", 1),
             _file(cache / "downloads" / "cifar-10-python.tar.gz", 13)]
    run = _file(cache / "runs" / "r1" / "variants" / "none" / "checkpoint.safetensors", 100)  # not by age
    victim = _file(tmp_path / "elsewhere" / "victim", 100)
    (cache / "store-cache" / "link").symlink_to(victim.parent)  # planted: never followed
    (cache / "prepared" / "file-link").symlink_to(victim)

    assert sorted(prune_cache()) == sorted(old)
    assert all(p.exists() for p in fresh + [run, victim])
    assert not (cache / "downloads" / "b").exists()  # emptied folders go too
    assert (cache / "store-cache" / "link").is_symlink() and (cache / "prepared" / "file-link").is_symlink()

    monkeypatch.setenv("TRAIN_CIFAR_CACHE_DAYS", "0.5")
    assert sorted(prune_cache()) == sorted(fresh)
    monkeypatch.setenv("TRAIN_CIFAR_CACHE_DAYS", "0")  # keep forever
    _file(cache / "downloads" / "ancient", 1000)
    assert prune_cache() == [] and (cache / "downloads" / "ancient").exists()


@pytest.mark.parametrize("value", ["-1", "two weeks", "nan"])
def test_a_bad_cache_days_is_named(cache, monkeypatch, value):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE_DAYS", value)
    with pytest.raises(ValueError, match=f"TRAIN_CIFAR_CACHE_DAYS: expected a number of days >= 0 .*found '{value}'"):
        prune_cache()


def test_fetch_prunes_first_and_refreshes_what_it_reuses(cache, tmp_path, capsys):
    from tasks.data import fetch_dataset

    ctx = run_context(tmp_path / "store", dataset="synthetic", synthetic_train=20, synthetic_test=20)
    fetch_dataset.fn(ctx)
    generated = cache / "synthetic" / "train20-test20" / "cifar-10-python.tar.gz"
    t = time.time() - 10 * DAY  # used ten days ago: kept, and refreshed by this use
    os.utime(generated, (t, t))
    stale = _file(cache / "downloads" / "old-mirror" / "a.tar.gz", 15)
    fetch_dataset.fn(ctx)
    assert not stale.exists() and "removed 1 file(s) unused for 14 days" in capsys.readouterr().out
    assert generated.stat().st_mtime > time.time() - 60


def test_local_copies_go_once_stored_but_never_the_store_itself(cache, tmp_path):
    _file(local_run_dir("r1") / "variants" / "none" / "checkpoint.safetensors", 0)
    _file(local_run_dir("r1") / "variants" / "flip" / "history.csv", 0)
    s3_like = open_store(str(tmp_path / "store"), outage_minutes=1)  # any store outside the cache
    drop_local_copies(s3_like, "r1", "variants", "none")
    assert not (local_run_dir("r1") / "variants" / "none").exists()
    assert (local_run_dir("r1") / "variants" / "flip" / "history.csv").exists()  # another variant's
    drop_local_copies(s3_like, "r1", "variants", "flip")
    assert not local_run_dir("r1").exists() and (cache / "runs").is_dir()  # emptied folders up to runs/

    # a local store inside the cache: its files are the store's, never deleted
    ckpt = _file(local_run_dir("r2") / "variants" / "none" / "checkpoint.safetensors", 0)
    for root in [cache, local_run_dir("r2") / "variants"]:
        drop_local_copies(LocalStore(root), "r2", "variants", "none")
        drop_local_copies(LocalStore(root), "r2")
        assert ckpt.exists()
    with pytest.raises(ValueError, match="run id"):
        drop_local_copies(s3_like, "../r2")
