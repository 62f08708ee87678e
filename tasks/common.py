"""What every task shares: the local work folder, store keys of a run, and retry rules."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from store import Store, StoreError, StoreOutage, StoreUnavailable, join_key, open_store, safe_name
from store.files import beneath
from store.lease import committed

LEASE = "lease.json"  # a unit's writer, and the pointer to its current files (store/lease.py)


def cache_dir() -> Path:
    """Local scratch space: downloads, prepared tensors, a run's files before upload.

    `TRAIN_CIFAR_CACHE` overrides it (a fast local disk on GPU workers)."""
    return Path(os.environ.get("TRAIN_CIFAR_CACHE", Path.home() / ".cache" / "train-cifar")).expanduser()


def run_key(run_id: str, *parts: str) -> str:
    """Store key under runs/<run-id>/; every part is a validated name or a fixed word."""
    return join_key("runs", safe_name(run_id, "run id"), *parts)


def probe_key(run_id: str) -> str:
    """The object the run's conditional-write probe uses (store/probe.py): created by the run's
    first probe, refused ever after on a store that honours conditional writes; never read."""
    return run_key(run_id, "conditional-write-probe")


@dataclass(frozen=True)
class Unit:
    """One repeat (seed) of one variant: the unit of work. In a run of one repeat its
    files sit in variants/<variant>/, as they always have; with repeats, each in
    variants/<variant>/seed-<seed>/ (`repeated`)."""

    variant: str
    seed: int
    repeated: bool = False

    @property
    def folder(self) -> str:
        """Its folder under variants/, also the prefix of its artifacts' names: `flip`, `flip/seed-1`."""
        name = safe_name(self.variant, "variant")
        return f"{name}/seed-{self.seed}" if self.repeated else name

    @property
    def label(self) -> str:
        """How logs, task runs and child flow runs name it: `flip`, `flip-s1`."""
        return f"{self.variant}-s{self.seed}" if self.repeated else self.variant

    def key(self, run_id: str, filename: str) -> str:
        return run_key(run_id, "variants", *self.folder.split("/"), filename)


def stored_key(store: Store, run_id: str, unit: Unit, name: str) -> str | None:
    """Store key of the unit's current `name` (checkpoint, history, metrics.json, ...): the
    generation's object its lease names; for a unit written before writes were fenced, the
    plain key under its folder. None if the store has none."""
    current = committed(store, unit.key(run_id, LEASE))
    if current is not None:
        return current["files"].get(name, {}).get("key")
    plain = unit.key(run_id, name)
    return plain if store.exists(plain) else None


def units_of(variants: list[str], seed: int, repeats: int) -> list[Unit]:
    """Every variant's repeats, seeds seed, seed + 1, ...: the run's units of work, variant by variant."""
    return [Unit(v, seed + r, repeats > 1) for v in variants for r in range(repeats)]


def inside(root: Path, path: Path, param: str) -> Path:
    """`path` (under `root`) as an absolute path, if no symlink below `root` is on its
    way; else a ValueError naming `param`, the parameter it was derived from, the link and
    where it points. Checked before anything is written or deleted there: a name check
    alone misses a symlink planted in a shared folder. The store's own rule (store/files.py)."""
    return beneath(root, path, param)


def local_run_dir(run_id: str, *parts: str) -> Path:
    """Where a run's files (`parts` below it) are written before (and kept after) upload."""
    root = cache_dir() / "runs"
    return inside(root, root.joinpath(safe_name(run_id, "run id"), *parts), "run_id")


def current_owner() -> str:
    """Who is writing: the flow run this code runs in (the same across its retries and
    reschedules), else this process."""
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    return str(fid) if fid else f"process-{socket.gethostname()}-{os.getpid()}"


def flow_run_is_over(owner: str) -> bool:
    """True if `owner` is a flow run that Prefect knows has ended (Crashed, Failed,
    Cancelled, Completed): whatever it held, it no longer writes. False if unknown."""
    import uuid

    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(owner)).state
    except Exception:  # noqa: BLE001 - not a flow run, or no API: cannot tell
        return False
    return state is not None and state.is_final()


def is_user_error(e: BaseException) -> bool:
    """A mistake the user fixes, whose message says what to do: bad input (ValueError and
    subclasses: a parameter, a data file) or a store that refuses (no such bucket, access
    denied, a lease another writer holds). Not an outage: the store may come back. Such an
    error is never retried, and the command line shows its message without a traceback."""
    return isinstance(e, ValueError) or (isinstance(e, StoreError)
                                         and not isinstance(e, (StoreUnavailable, StoreOutage)))


def is_io_error(task, task_run, state) -> bool:
    """Retry transient I/O only; a user's error fails at once, and so does an outage that
    outlasted its window (StoreOutage: the window was the retrying)."""
    try:
        state.result()
    except Exception as e:
        return not is_user_error(e) and not isinstance(e, StoreOutage)
    return False


def materialize(store: Store, key: str, filenames: list[str], limits: dict[str, int] | None = None) -> Path:
    """A local folder holding `key/<filename>` for each file: the store's own folder for
    a local store, else a download cache reused across runs on this machine. `limits`:
    the most bytes a file may have (name -> bytes); a larger one is refused (TooLarge)
    before it is downloaded, as the local store's file is by its reader."""
    from store.local import LocalStore

    inner = getattr(store, "inner", store)  # a PatientStore's own store (store/outage.py)
    if isinstance(inner, LocalStore):
        for name in filenames:
            inner.path_of(f"{key}/{name}")  # no symlink on the way to a file read by path
        return inner.path_of(key)
    root = cache_dir() / "store-cache"
    for name in filenames:
        path = inside(root, root / join_key(key, name), key)
        if path.is_file():
            os.utime(path)  # used now: the cache's age rule (tasks/cache.py) counts from here
        else:
            store.get_file(f"{key}/{name}", path, limit=(limits or {}).get(name))
    return inside(root, root / key, key)


__all__ = ["cache_dir", "current_owner", "flow_run_is_over", "inside", "is_io_error", "local_run_dir",
           "materialize", "open_store", "probe_key", "run_key", "stored_key", "units_of", "Unit", "LEASE"]
