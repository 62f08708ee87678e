"""fetch_dataset: get the archive, verify it, prepare it once per MD5 in the store."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cnn import data as cd
from cnn.synthetic import write_archive
from store import join_key, open_store, parse_uri
from tasks.cache import cache_days, mark_used, prune_cache
from tasks.common import cache_dir, inside, is_io_error, materialize

PREPARED_FILES = [cd.PREPARED_FILE, cd.PREPARED_META]


def _s3_archive(uri: str, md5: str, outage_minutes: float | None) -> tuple[Path, bool]:
    """Download `s3://bucket/key` into the local cache; (local path, downloaded by this call).
    A cached copy is reused only if it has the expected `md5`."""
    try:  # also checked by RunParams; this task may be called without them
        bucket, key = parse_uri(uri)
    except ValueError as e:
        raise ValueError(f"data_source: {e}") from None
    root = cache_dir() / "downloads"
    local = inside(root, root / bucket / key, "data_source")
    if local.is_file() and cd.md5_of(local) == md5:
        mark_used(local)
        return local, False
    open_store(f"s3://{bucket}", outage_minutes=outage_minutes).get_file(key, local)
    return local, True


def _locate(dataset: str, data_dir: str | None, data_source: str | None, data_md5: str | None,
            synthetic_train: int, synthetic_test: int) -> tuple[str, str, Path | None, str | None]:
    """(name, source, local archive or None if not fetched yet, expected md5 or None)."""
    if dataset == "synthetic":
        root = cache_dir() / "synthetic"
        out = inside(root, root / f"train{synthetic_train}-test{synthetic_test}" / cd.ARCHIVE_NAME, "dataset").parent
        path, md5 = (out / cd.ARCHIVE_NAME, None)
        if path.is_file():
            mark_used(out)
        else:
            path, md5 = write_archive(out, synthetic_train, synthetic_test, seed=0)
        return "synthetic", f"synthetic(train={synthetic_train}, test={synthetic_test}, seed=0)", path, md5 or cd.md5_of(path)
    if data_dir:
        return "cifar10", str(Path(data_dir).expanduser().resolve()), cd.find_archive(Path(data_dir).expanduser()), data_md5
    if data_source:
        return "cifar10", data_source, None, data_md5 or cd.ARCHIVE_MD5
    return "cifar10", cd.ARCHIVE_URL, None, cd.ARCHIVE_MD5


@task(name="fetch-dataset", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=is_io_error)
def fetch_dataset(dataset: str, data_dir: str | None, data_source: str | None, data_md5: str | None,
                  synthetic_train: int, synthetic_test: int, store_uri: str,
                  store_outage_minutes: float | None = None) -> dict:
    """Fetch, verify and prepare CIFAR-10 once; returns where the prepared tensors are.

    The store is the cache: `datasets/<name>/<md5>/` is reused by every later run
    and every machine, so a rerun neither downloads nor decodes. A store or mirror
    outage is waited out for `store_outage_minutes` (None: not at all)."""
    removed = prune_cache()  # this machine's cached files unused for TRAIN_CIFAR_CACHE_DAYS
    if removed:
        print(f"cache {cache_dir()}: removed {len(removed)} file(s) unused for {cache_days():g} days")
    store = open_store(store_uri, outage_minutes=store_outage_minutes)
    name, source, path, md5 = _locate(dataset, data_dir, data_source, data_md5, synthetic_train, synthetic_test)
    if md5 is not None:  # known before fetching: maybe nothing to do
        key = join_key("datasets", name, md5)
        if all(store.exists(f"{key}/{f}") for f in PREPARED_FILES):
            print(f"dataset {name} {md5}: prepared copy found in the store, nothing to download")
            return _info(store, name, source, md5, key)
    downloaded = False  # only a file this call downloaded is ever deleted
    if path is None and data_source:
        path, downloaded = _s3_archive(data_source, md5, store_outage_minutes)
    elif path is None:
        path = cd.download_cifar10(cache_dir() / "downloads")
        mark_used(path)  # reused rather than downloaded: still counts as a use
    # a user's MD5 if given; else the official checks (the synthetic set is checked against itself)
    try:
        md5 = cd.verify(path, data_md5 or (md5 if name == "synthetic" else None))
    except cd.DataError as e:
        if not data_source:
            raise
        if downloaded:
            path.unlink(missing_ok=True)  # a bad download is not kept: a fixed mirror is fetched again
        raise cd.DataError(f"--data-source {data_source}: {e}") from None
    key = join_key("datasets", name, md5)
    if not all(store.exists(f"{key}/{f}") for f in PREPARED_FILES):
        root = cache_dir() / "prepared"
        local = cd.prepare(path, md5, inside(root, root / name / md5 / cd.PREPARED_FILE, "dataset").parent)
        for f in PREPARED_FILES:
            store.put_file(f"{key}/{f}", local / f)
        print(f"dataset {name} {md5}: decoded and stored at {store.uri_for(key)}")
    return _info(store, name, source, md5, key)


def _info(store, name: str, source: str, md5: str, key: str) -> dict:
    import json

    meta = json.loads((materialize(store, key, PREPARED_FILES) / cd.PREPARED_META).read_text())
    return {"name": name, "source": source, "md5": md5, "key": key, "train": meta["train"],
            "holdout": meta["holdout"], "classes": meta["classes"]}
