"""Waiting out a store outage: what failed with StoreUnavailable is tried again, with
backoff, until the store has been unreachable for longer than `store_outage_minutes`.

A MinIO pod restarting or a load balancer failing over drops connections for longer
than botocore's retries; an hour of training must not be lost to that.

One `Outage` per store is shared by every caller (training, uploader, lease): the clock
starts when the first failed call was started (a hung endpoint is noticed only when its
request times out) and stops at the first success.

Only a store that has answered in this process is waited for: one never reached is a
configuration error (a typo in AWS_ENDPOINT_URL), not worth the whole window. What
answered is remembered per endpoint, not per store object (every task opens its own).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from store.base import MAX_DOCUMENT_BYTES, Store, StoreError, StoreOutage, StoreUnavailable, StoreUnreachable
from store.scrub import scrub

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0  # so a store that is back is used again within seconds


_answered: set[str] = set()
_answered_lock = threading.Lock()


class Outage:
    def __init__(self, window_s: float, where: str):
        if window_s < 0:
            raise ValueError(f"store_outage_minutes: expected 0 or more, found {window_s / 60:g}")
        self.window_s, self.where = window_s, scrub(where)
        self._since: float | None = None
        self._lock = threading.Lock()

    def answered(self) -> None:
        with _answered_lock:
            _answered.add(self.where)

    def ever_answered(self) -> bool:
        with _answered_lock:
            return self.where in _answered

    def succeeded(self) -> None:
        self.answered()
        with self._lock:
            self._since = None

    def failed(self, started: float, err: StoreUnavailable | None = None) -> float:
        """Seconds unreachable, counting a call started at `started` (monotonic) that failed.
        Without `err` (the uploader, which starts only after the lease's claim was answered)
        the failure is only counted."""
        if isinstance(err, StoreUnreachable) and not self.ever_answered():
            raise self.misconfigured(err) from err
        if err is not None and not isinstance(err, StoreUnreachable):
            self.answered()  # a 5xx
        with self._lock:
            if self._since is None or started < self._since:
                self._since = started
            return time.monotonic() - self._since

    def misconfigured(self, last: Exception) -> StoreError:
        return StoreError(scrub(
            f"{self.where} has not answered once since this process started, so this is taken for a "
            "configuration error, not an outage (an outage is waited for only once the store has answered): "
            f"check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and that the store is running. Last error: {last}"))

    def unreachable_s(self) -> float:
        with self._lock:
            return 0.0 if self._since is None else time.monotonic() - self._since

    def over(self) -> bool:
        with self._lock:
            return self._since is not None and time.monotonic() - self._since >= self.window_s

    def give_up(self, last: Exception | str) -> StoreOutage:
        return StoreOutage(scrub(f"{self.where} did not answer for {self.unreachable_s():.0f} s, longer than the "
                                 f"store_outage_minutes window ({self.window_s / 60:g} min); giving up. "
                                 f"Last error: {last}"))

    def call(self, fn: Callable[..., T], *args, **kw) -> T:
        delay = FIRST_DELAY_S
        while True:
            started = time.monotonic()
            try:
                out = fn(*args, **kw)
            except StoreUnavailable as e:
                down = self.failed(started, e)
                if down >= self.window_s:
                    raise self.give_up(e) from e
                wait = min(delay, self.window_s - down)  # one last try at the end of the window
                log.warning("%s; trying again in %.1f s (unreachable for %.0f s of at most %.0f s)",
                            scrub(str(e)), wait, down, self.window_s)
                time.sleep(wait)
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            except StoreError:  # refused: it answered
                self.answered()
                raise
            self.succeeded()
            return out


class PatientStore(Store):
    """A store whose every operation waits out an outage; other attributes are the wrapped store's."""

    def __init__(self, inner: Store, outage: Outage):
        self.inner, self.outage, self.uri = inner, outage, inner.uri

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_file(self, key: str, path: Path) -> dict:
        return self.outage.call(self.inner.put_file, key, path)

    def get_file(self, key: str, path: Path, limit: int | None = None) -> Path:
        return self.outage.call(self.inner.get_file, key, path, limit)

    def exists(self, key: str) -> bool:
        return self.outage.call(self.inner.exists, key)

    def list(self, prefix: str) -> list[str]:
        return self.outage.call(self.inner.list, prefix)

    def read_versioned(self, key: str, limit: int = MAX_DOCUMENT_BYTES) -> tuple[bytes | None, str | None]:
        return self.outage.call(self.inner.read_versioned, key, limit)

    def read_stamped(self, key: str, limit: int) -> tuple[bytes | None, str | None, float | None]:
        return self.outage.call(self.inner.read_stamped, key, limit)

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        # a retried conditional write whose first try was applied answers PreconditionFailed:
        # the champion's rule already reads back who won (registry/champions.py)
        return self.outage.call(self.inner.write_if, key, data, version)

    def uri_for(self, key: str) -> str:
        return self.inner.uri_for(key)

    def link_for(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        return self.outage.call(self.inner.link_for, key, expires_s)
