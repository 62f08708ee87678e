"""Get the dataset archive, verify it, prepare it once per MD5 in the store.

The store's prepared copy (`datasets/<name>/<md5>/`) is trusted only if its SHA-256
equals what this run derived from the verified archive. That hash lives in the run's
DatasetRef (so in Prefect), never in the store: any store writer can rewrite the copy
and its meta.json. A mismatch is prepared again over (fetch) or refused (load).
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cnn import data as cd
from cnn.synthetic import write_archive
from store import TooLarge, join_key, open_store, parse_uri
from store.files import beneath
from run.cache import cache_days, cache_dir, mark_used, materialize, prune_cache
from run.context import RunContext
from run.errors import is_io_error
from run.records import DatasetRef

PREPARED_FILES = [cd.PREPARED_FILE, cd.PREPARED_META]


def _s3_archive(uri: str, md5: str, outage_minutes: float | None) -> tuple[Path, bool]:
    """(local path, downloaded by this call); a cached copy is reused only with `md5`."""
    try:  # also checked by RunParams; this task may be called without them
        bucket, key = parse_uri(uri)
    except ValueError as e:
        raise ValueError(f"data_source: {e}") from None
    root = cache_dir() / "downloads"
    local = beneath(root, root / bucket / key, "data_source")
    if local.is_file() and cd.md5_of(local) == md5:
        mark_used(local)
        return local, False
    try:  # refused before download: a huge object would fill the disk before its MD5 is checked
        open_store(f"s3://{bucket}", outage_minutes=outage_minutes).get_file(key, local, limit=cd.MAX_ARCHIVE_BYTES)
    except TooLarge as e:
        raise cd.DataError(f"--data-source {uri}: {e} (the official CIFAR-10 archive is "
                           f"{cd.OFFICIAL_ARCHIVE_BYTES:,} bytes)") from None
    return local, True


def _locate(p) -> tuple[str, str, Path | None, str | None]:
    """(name, source, local archive or None, expected md5 or None)."""
    if p.dataset == "synthetic":
        root = cache_dir() / "synthetic"
        out = beneath(root, root / f"train{p.synthetic_train}-test{p.synthetic_test}" / cd.ARCHIVE_NAME, "dataset").parent
        path, md5 = (out / cd.ARCHIVE_NAME, None)
        if path.is_file():
            mark_used(out)
        else:
            path, md5 = write_archive(out, p.synthetic_train, p.synthetic_test, seed=0)
        return ("synthetic", f"synthetic(train={p.synthetic_train}, test={p.synthetic_test}, seed=0)", path,
                md5 or cd.md5_of(path))
    if p.data_dir:
        return "cifar10", str(Path(p.data_dir).expanduser().resolve()), cd.find_archive(Path(p.data_dir).expanduser()), p.data_md5
    if p.data_source:
        return "cifar10", p.data_source, None, p.data_md5 or cd.ARCHIVE_MD5
    return "cifar10", cd.ARCHIVE_URL, None, cd.ARCHIVE_MD5


@task(name="fetch-dataset", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=is_io_error)
def fetch_dataset(ctx: RunContext) -> DatasetRef:
    """The store is the cache: a rerun on any machine neither downloads nor decodes."""
    p, store = ctx.params, ctx.store
    data_md5, data_source = p.data_md5, p.data_source
    removed = prune_cache()
    if removed:
        print(f"cache {cache_dir()}: removed {len(removed)} file(s) unused for {cache_days():g} days")
    name, source, path, md5 = _locate(p)
    if md5 is not None:
        found, _ = _stored(store, name, source, md5)
        if found is not None:
            print(f"dataset {name} {md5}: prepared copy found in the store and checked, nothing to download")
            return found
    downloaded = False  # only a file this call downloaded is ever deleted
    if path is None and data_source:
        path, downloaded = _s3_archive(data_source, md5, p.store_outage_minutes)
    elif path is None:
        path = cd.download_cifar10(cache_dir() / "downloads")
        mark_used(path)
    # no MD5 given: the official archive's checks (the synthetic set is checked against itself)
    try:
        md5 = cd.verify(path, data_md5 or (md5 if name == "synthetic" else None))
    except cd.DataError as e:
        if not data_source:
            raise
        if downloaded:
            path.unlink(missing_ok=True)  # so a fixed mirror is fetched again
        raise cd.DataError(f"--data-source {data_source}: {e}") from None
    local, prepared = _prepared_dir(name, md5), False
    if _expected_sha256(name, md5) is None:  # never decoded here: learn the SHA-256 the store's copy must have
        cd.prepare(path, md5, local)
        prepared = True
    found, why = _stored(store, name, source, md5)
    if found is not None:
        print(f"dataset {name} {md5}: prepared copy found in the store and checked")
        return found
    if not prepared:
        cd.prepare(path, md5, local)
    key = join_key("datasets", name, md5)
    for f in PREPARED_FILES:
        store.put_file(f"{key}/{f}", local / f)
    print(f"dataset {name} {md5}: {why}: decoded and stored at {store.uri_for(key)}")
    found, why = _stored(store, name, source, md5)
    if found is None:
        raise cd.DataError(f"{why} (replaced while this run stored it?); run again")
    return found


def _prepared_dir(name: str, md5: str) -> Path:
    """This machine's prepared copy: its meta.json's `sha256` is the expected hash."""
    root = cache_dir() / "prepared"
    return beneath(root, root / name / md5, "dataset")


def _expected_sha256(name: str, md5: str) -> str | None:
    meta = _prepared_dir(name, md5) / cd.PREPARED_META
    try:
        return json.loads(cd.read_bounded(meta, cd.MAX_PREPARED_META_BYTES, "a dataset's meta.json"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or written by an older version
        return None


def _stored(store, name: str, source: str, md5: str) -> tuple[DatasetRef | None, str | None]:
    """(ref, None) if the store's prepared copy matches the SHA-256 derived here; else (None, why)."""
    sha256 = _expected_sha256(name, md5)
    key = join_key("datasets", name, md5)
    if sha256 is None:
        return None, "not decoded on this machine yet"
    if not all(store.exists(f"{key}/{f}") for f in PREPARED_FILES):
        return None, "no prepared copy in the store"
    try:  # the store's object, not a copy downloaded before: a poisoned one is repaired here
        tensors, classes = _checked(store, key, lambda folder: cd.read_prepared(folder, sha256), fresh=True)
    except cd.DataError as e:
        return None, str(e)
    return DatasetRef(name=name, source=source, md5=md5, key=key, sha256=sha256, train=len(tensors["train_y"]),
                      holdout=len(tensors["holdout_y"]), classes=classes), None


def _checked(store, key: str, read, fresh: bool = False):
    """`read(folder)` of the store's prepared copy at `key`. A cached download that fails
    is downloaded once more: it may predate a repair of the store's copy."""
    def download_again() -> None:  # materialize's cache (nothing there for a local store)
        for f in PREPARED_FILES:
            (cache_dir() / "store-cache" / key / f).unlink(missing_ok=True)

    def fetched() -> Path:  # what cnn.data's readers would refuse is not downloaded either
        limits = {cd.PREPARED_FILE: cd.MAX_PREPARED_BYTES, cd.PREPARED_META: cd.MAX_PREPARED_META_BYTES}
        try:
            return materialize(store, key, PREPARED_FILES, limits)
        except TooLarge as e:
            raise cd.DataError(str(e)) from None

    if fresh:
        download_again()
    folder = fetched()
    try:
        return read(folder)
    except cd.DataError:
        if fresh or not folder.is_relative_to(cache_dir() / "store-cache"):
            raise  # the store's own folder, or just downloaded: nothing newer to get
        download_again()
        return read(fetched())


def load_dataset(store, dataset: DatasetRef, split_seed: int, subset: int | None = None) -> cd.Splits:
    """The run's splits; the hold-out images the run purged (`dataset.purged`) are in
    neither validation nor test, wherever the splits are loaded (parent or child)."""
    return _checked(store, dataset.key,
                    lambda folder: cd.load_splits(folder, split_seed, subset, dataset.sha256, dataset.purged))


def load_prepared(store, dataset: DatasetRef) -> tuple[dict, list[str]]:
    """The whole prepared dataset (every train and hold-out image), unsplit."""
    return _checked(store, dataset.key, lambda folder: cd.read_prepared(folder, dataset.sha256))
