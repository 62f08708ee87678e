"""Object storage: `open_store("./artifacts")` or `open_store("s3://bucket/prefix")`.
Store URIs are parsed and validated here only."""
from __future__ import annotations

from pathlib import Path

from store.base import (MAX_DOCUMENT_BYTES, MAX_MODEL_BYTES, PreconditionFailed, Store, StoreError, StoreOutage, StoreUnavailable,
                        StoreUnreachable, TooLarge, check_size, join_key, name_part, parse_uri, read_at_most, safe_name,
                        sha256_of)
from store.local import LocalStore
from store.probe import require_conditional_writes
from store.scrub import scrub


def normalize_uri(uri: str) -> str:
    """`s3://bucket[/prefix]` without a trailing slash, or an absolute local path."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"expected a local folder or s3://bucket/prefix, found {uri!r}")
    if uri.startswith("s3://"):
        bucket, prefix = parse_uri(uri)
        return f"s3://{bucket}/{prefix}".rstrip("/")
    if "://" in uri:  # http://user:password@minio:9000 given as the store: shown scrubbed
        raise ValueError(f"expected a local folder or s3://bucket/prefix, found {scrub(repr(uri))}")
    return str(Path(uri).expanduser().resolve())


def is_shared(uri: str) -> bool:
    """Can a process on another machine (or in another working directory) reach this store as written?"""
    return uri.startswith("s3://") or Path(uri).is_absolute()


def open_store(uri: str, must_exist: bool = False, outage_minutes: float | None = None) -> Store:
    """With `must_exist`, a missing local folder is a FileNotFoundError (a bucket is checked at
    its first request). With `outage_minutes`, every operation waits out an outage that long;
    without it, it fails at boto3's last retry."""
    uri = normalize_uri(uri)
    if uri.startswith("s3://"):
        from store.s3 import S3Store  # boto3 only when S3 is used

        store = S3Store(uri)
        where = f"the S3 endpoint {store.endpoint}"
    else:
        if must_exist and not Path(uri).is_dir():
            raise FileNotFoundError(f"--store {uri}: no such folder")
        store, where = LocalStore(uri), f"the store folder {uri}"
    if outage_minutes is None:
        return store
    from store.outage import Outage, PatientStore

    return PatientStore(store, Outage(outage_minutes * 60, where))


__all__ = ["LocalStore", "MAX_DOCUMENT_BYTES", "MAX_MODEL_BYTES", "PreconditionFailed", "Store", "StoreError", "StoreOutage",
           "StoreUnavailable", "StoreUnreachable", "TooLarge", "check_size", "is_shared", "join_key", "normalize_uri",
           "name_part", "open_store", "parse_uri", "read_at_most", "require_conditional_writes", "safe_name", "scrub",
           "sha256_of"]
