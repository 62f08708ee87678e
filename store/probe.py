"""Does the store honour conditional writes? Checked once per store and process, before a
run writes anything.

The champion's compare-and-swap and the one-writer leases rest on `If-None-Match: *` and
`If-Match: <etag>`. Some S3-compatible servers accept both headers and overwrite anyway,
so two writers silently take turns. So one object of the caller's is written create-only
(succeeds the first time), then create-only again and at a version it never had: both
must be refused. The object is left in place: deleting needs s3:DeleteObject, which no
role is granted.
"""
from __future__ import annotations

import threading

from store.base import PreconditionFailed, Store, StoreError

PROBE_NOTE = (b"train-cifar writes this object to check that the store refuses conditional writes that lose "
              b"(If-None-Match: *, If-Match: <etag>); it is never read, and safe to delete.\n")
_WRONG_VERSION = '"0000000000000000000000000000-not-a-version"'  # quoted like an ETag; never any object's

_honoured: set[tuple[str, str | None]] = set()  # (store URI, endpoint)
_lock = threading.Lock()


def require_conditional_writes(store: Store, key: str) -> None:
    endpoint = getattr(store, "endpoint", None)
    seen = (store.uri, endpoint)
    with _lock:
        if seen in _honoured:
            return
    try:
        store.write_if(key, PROBE_NOTE, None)
    except PreconditionFailed:
        pass
    for condition, version, what in [
            ("If-None-Match: *", None, "a create-only write replaced an object that already existed"),
            ("If-Match", _WRONG_VERSION, "a write conditional on a version the object never had replaced it")]:
        try:
            store.write_if(key, PROBE_NOTE, version)
        except PreconditionFailed:
            continue
        where = f"{store.uri} (the S3 endpoint {endpoint})" if endpoint else store.uri
        raise StoreError(
            f"{where} does not honour conditional writes ({condition}): {what} ({store.uri_for(key)}). "
            "The champion's compare-and-swap and the one-writer leases depend on them; on this store two "
            "writers would silently overwrite each other. Use a store that refuses them with 412 "
            "PreconditionFailed, as AWS S3 does")
    with _lock:
        _honoured.add(seen)
