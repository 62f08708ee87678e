"""Object storage: `open_store("./artifacts")` or `open_store("s3://bucket/prefix")`."""
from __future__ import annotations

from store.base import PreconditionFailed, Store, StoreError, StoreUnavailable, join_key, safe_name, sha256_of
from store.local import LocalStore


def open_store(uri: str) -> Store:
    """The store for `uri`: a local folder, or `s3://bucket[/prefix]`."""
    if uri.startswith("s3://"):
        from store.s3 import S3Store  # boto3 only when S3 is used

        return S3Store(uri)
    if "://" in uri:
        raise ValueError(f"--store {uri!r}: expected a local folder or s3://bucket/prefix")
    return LocalStore(uri)


__all__ = ["LocalStore", "PreconditionFailed", "Store", "StoreError", "StoreUnavailable", "join_key", "open_store", "safe_name", "sha256_of"]
