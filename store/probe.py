"""Does the store honour conditional writes? Checked once per store and process, before a run
(a train-variant child, a champion rollback) writes anything.

The champion's compare-and-swap and the one-writer leases rest on two S3 conditions:
`If-None-Match: *` (create only if absent) and `If-Match: <etag>` (replace only the
version that was read), each refused with 412 when it does not hold. Some S3-compatible
servers accept both headers and overwrite anyway; there every conditional write
succeeds and two writers silently take turns (last writer wins). So before relying on
them, one small object of the caller's (a key it may write) is written three times, and
the two writes that must lose must be refused:

1. create-only: succeeds the first time (nothing there yet), refused ever after;
2. create-only again: it exists now, so it must be refused;
3. replace-only-if at a version that was never the object's: must be refused.

On a store that honours them, only the very first probe of a key writes anything. The
object is left in place: deleting needs s3:DeleteObject, which no role is granted.
"""
from __future__ import annotations

import threading

from store.base import PreconditionFailed, Store, StoreError

PROBE_NOTE = (b"train-cifar writes this object to check that the store refuses conditional writes that lose "
              b"(If-None-Match: *, If-Match: <etag>); it is never read, and safe to delete.\n")
_WRONG_VERSION = '"0000000000000000000000000000-not-a-version"'  # quoted like an ETag; never any object's

_honoured: set[tuple[str, str | None]] = set()  # (store URI, endpoint) already probed in this process
_lock = threading.Lock()


def require_conditional_writes(store: Store, key: str) -> None:
    """Return if `store` refuses both conditional writes that must lose (using the object
    `key`), else raise a StoreError naming the store, its endpoint and what it did not
    honour. Once per store and process: later calls return at once."""
    endpoint = getattr(store, "endpoint", None)  # an S3 store's, scrubbed (store/s3.py)
    seen = (store.uri, endpoint)
    with _lock:
        if seen in _honoured:
            return
    try:
        store.write_if(key, PROBE_NOTE, None)  # the first probe creates it; later ones are refused
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


__all__ = ["require_conditional_writes"]
