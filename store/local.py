"""A store in a local folder: every write goes to a temporary file, then is renamed."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from store.base import PreconditionFailed, Store, join_key, sha256_of, too_big


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / join_key(key)

    def put_file(self, key: str, path: Path) -> dict:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # atomic: readers see the old file or the new one
        return {"uri": self.uri_for(key), "sha256": sha256_of(dest), "bytes": dest.stat().st_size}

    def get_file(self, key: str, path: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: not in the store")
        path.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != Path(path).resolve():
            shutil.copyfile(src, path)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        p = self._path(key)
        if not p.is_file():
            return None, None
        data = p.read_bytes()
        return data, hashlib.md5(data).hexdigest()

    def read_stamped(self, key: str, max_bytes: int) -> tuple[bytes | None, str | None, float | None]:
        p = self._path(key)
        if not p.is_file():
            return None, None, None
        with open(p, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_size > max_bytes:
                raise too_big(self.uri_for(key), max_bytes, stat.st_size)
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew since the stat
            raise too_big(self.uri_for(key), max_bytes, len(data))
        # the file system stamped the mtime when the file was renamed into place; on a
        # shared disk that is its server's clock, as it is for every reader
        return data, hashlib.md5(data).hexdigest(), max(0.0, time.time() - stat.st_mtime)

    @contextmanager
    def _lock(self, key: str):
        lock = self._path(key).with_name(f".{Path(key).name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        with self._lock(key):  # compare-and-swap across processes on this machine
            _, current = self.read_versioned(key)
            if current != version:
                raise PreconditionFailed(f"{self.uri_for(key)} changed since it was read")
            dest = self._path(key)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
            tmp.write_bytes(data)
            os.replace(tmp, dest)

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def link_for(self, key: str, expires_s: int = 0) -> str:
        return self._path(key).as_uri()
