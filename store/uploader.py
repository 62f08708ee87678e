"""Keeping the store's copy of a few local files current, in the background, through outages.

Training must not wait for (or die with) a store that is restarting: `submit` snapshots
the files and returns at once; a thread uploads the newest snapshot, trying again with
backoff, a newer snapshot replacing one not yet uploaded. Meanwhile the local files are
the truth. The writer learns what must stop it at its next `check`.
"""
from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from store.base import Store, StoreUnavailable
from store.outage import FIRST_DELAY_S, MAX_DELAY_S, Outage

log = logging.getLogger(__name__)


@dataclass
class _Snapshot:
    folder: Path  # private copies: training goes on rewriting the originals
    files: dict[str, Path]  # store key (or name, for `send`) -> local copy


class Uploader:
    def __init__(self, store: Store, outage: Outage, staging: Path, before: Callable[[], None] = lambda: None,
                 send: Callable[[dict[str, Path]], dict[str, dict]] | None = None):
        """`store` and `send` (a lease's `publish`, if given) must fail fast: the waiting is done
        here. `before()` runs before each upload (a lease renewal: LeaseLost stops it)."""
        self.store, self.outage, self.staging, self.before = store, outage, staging, before
        self.send = send or (lambda files: {key: store.put_file(key, path) for key, path in files.items()})
        self.uploaded: dict[str, dict] = {}  # key -> {uri, sha256, bytes} of its newest stored version
        self._pending: _Snapshot | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._last: Exception | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        shutil.rmtree(staging, ignore_errors=True)  # copies left by an earlier attempt are stale
        self._thread = threading.Thread(target=self._run, name=f"uploader-{staging.parent.name}", daemon=True)
        self._thread.start()

    def submit(self, files: dict[str, Path]) -> None:
        self.check()
        folder = self.staging / str(next(self._numbers))
        folder.mkdir(parents=True)
        copies = {}
        for key, path in files.items():
            copies[key] = folder / key.replace("/", "__")
            shutil.copyfile(path, copies[key])
        with self._cond:
            if self._pending is not None:
                shutil.rmtree(self._pending.folder, ignore_errors=True)
            self._pending = _Snapshot(folder, copies)
            self._cond.notify_all()

    def check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.outage.over():
            raise self.outage.give_up(self._last)

    def flush(self) -> None:
        with self._cond:
            while self._pending is not None or self._busy:
                self.check()
                self._cond.wait(0.5)
        self.check()

    def close(self, flush: bool) -> None:
        """With `flush`, first store what is pending, but only if the store is answering: an
        unreachable one is not waited for again."""
        if flush and self._error is None and self.outage.unreachable_s() == 0:
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - the writer's own error is the one to report
                log.warning("the last upload did not finish: %s", e)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        # a request to a hung endpoint ends at its timeouts; the daemon thread is not waited for
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(flush=exc_type is not None)

    def _next(self) -> _Snapshot | None:
        """The snapshot to upload now, once there is one; None when closing."""
        with self._cond:
            while self._pending is None and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            snap, self._pending, self._busy = self._pending, None, True
            return snap

    def _requeue(self, snap: _Snapshot, delay: float) -> None:
        with self._cond:
            if self._pending is None:
                self._pending = snap
            else:
                shutil.rmtree(snap.folder, ignore_errors=True)
            self._busy = False
            self._cond.notify_all()
            self._cond.wait(delay)  # a new snapshot or close wakes it early

    def _run(self) -> None:
        delay = FIRST_DELAY_S
        while (snap := self._next()) is not None:
            started = time.monotonic()
            try:
                self.before()
                stored = self.send(snap.files)
            except StoreUnavailable as e:
                down = self.outage.failed(started)
                self._last = e
                log.warning("%s; the local copy is kept and sent again in %.1f s (store unreachable for %.0f s)",
                            e, delay, down)
                self._requeue(snap, delay)
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            except BaseException as e:  # noqa: BLE001 - LeaseLost, a permanent store error: this writer stops
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            self.outage.succeeded()
            delay = FIRST_DELAY_S
            shutil.rmtree(snap.folder, ignore_errors=True)
            with self._cond:
                self.uploaded.update(stored)
                self._busy = False
                self._cond.notify_all()
