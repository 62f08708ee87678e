"""A store in a local folder; every key is reached through store/files.py."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from store.base import MAX_DOCUMENT_BYTES, PreconditionFailed, Store, check_size, join_key, read_at_most, too_big
from store.files import beneath, no_link, open_dir, open_file, publish, publishing

_CHUNK = 1 << 20


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / join_key(key)

    def path_of(self, key: str) -> Path:
        """The local path of `key` (a file or a folder), for code that reads by path."""
        return beneath(self.root, join_key(key), key)

    @contextmanager
    def _folder(self, key: str, create: bool = False) -> Iterator[tuple[int, list[str]]]:
        parts = join_key(key).split("/")
        try:
            fd = open_dir(self.root, parts[:-1], key, create, whole=parts)
        except NotADirectoryError:
            if create:
                raise
            raise FileNotFoundError(f"{self._path(key)}: not in the store") from None
        try:
            no_link(fd, self.root, parts, key)
            yield fd, parts
        finally:
            os.close(fd)

    def _open(self, fd: int, parts: list[str], key: str):
        try:
            f = os.fdopen(open_file(fd, self.root, parts, key), "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            return None
        return f

    def _open_key(self, key: str):
        try:
            with self._folder(key) as (fd, parts):
                return self._open(fd, parts, key)
        except FileNotFoundError:
            return None

    def put_file(self, key: str, path: Path) -> dict:
        sha, size = hashlib.sha256(), 0

        def copy(out) -> None:  # hashed as written: the digest is of the bytes stored
            nonlocal size
            with open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                    size += len(chunk)

        with self._folder(key, create=True) as (fd, parts):
            publish(fd, parts[-1], copy)
        return {"uri": self.uri_for(key), "sha256": sha.hexdigest(), "bytes": size}

    def put_bytes(self, key: str, data: bytes, tmp_dir: Path) -> dict:
        with self._folder(key, create=True) as (fd, parts):
            publish(fd, parts[-1], lambda out: out.write(data))
        return {"uri": self.uri_for(key), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def get_file(self, key: str, path: Path, limit: int | None = None) -> Path:
        src = self._open_key(key)
        if src is None:
            raise FileNotFoundError(f"{self._path(key)}: not in the store")
        with src:
            if limit is not None:
                check_size(str(self._path(key)), os.fstat(src.fileno()).st_size, limit, "this download")
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(src.fileno()), os.stat(path)):
                    return path  # already there: the store's own file
            with publishing(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        return path

    def exists(self, key: str) -> bool:
        try:
            with self._folder(key) as (fd, parts):
                return stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        parts = join_key(prefix).split("/") if prefix else []
        try:
            fd = open_dir(self.root, parts, prefix)
        except (FileNotFoundError, NotADirectoryError):
            return []
        keys = []
        try:
            for folder, _, files, dir_fd in os.fwalk(".", dir_fd=fd):  # follows no symlink
                for name in files:
                    try:
                        regular = stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                    except FileNotFoundError:
                        continue
                    if regular and not name.startswith("."):
                        keys.append("/".join([*parts, *Path(folder).parts, name]))
        finally:
            os.close(fd)
        return sorted(keys)

    def read_versioned(self, key: str, limit: int = MAX_DOCUMENT_BYTES) -> tuple[bytes | None, str | None]:
        try:
            with self._folder(key) as (fd, parts):
                return self._read(fd, parts, key, limit)
        except FileNotFoundError:
            return None, None

    def _read(self, fd: int, parts: list[str], key: str, limit: int = MAX_DOCUMENT_BYTES
              ) -> tuple[bytes | None, str | None]:
        f = self._open(fd, parts, key)
        if f is None:
            return None, None
        with f:
            where = str(self._path(key))
            check_size(where, os.fstat(f.fileno()).st_size, limit, "a store document")
            data = read_at_most(f, limit, where, "a store document")
        return data, hashlib.md5(data).hexdigest()

    def read_stamped(self, key: str, limit: int) -> tuple[bytes | None, str | None, float | None]:
        f = self._open_key(key)
        if f is None:
            return None, None, None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                raise too_big(self.uri_for(key), limit, st.st_size)
            data = f.read(limit + 1)
        if len(data) > limit:
            raise too_big(self.uri_for(key), limit, len(data))
        # the file system stamped the mtime when the file was renamed into place; on a
        # shared disk that is its server's clock, as it is for every reader
        return data, hashlib.md5(data).hexdigest(), max(0.0, time.time() - st.st_mtime)

    @contextmanager
    def _lock(self, fd: int, parts: list[str], key: str):
        lock = [*parts[:-1], f".{parts[-1]}.lock"]
        with os.fdopen(open_file(fd, self.root, lock, key, os.O_RDWR | os.O_CREAT), "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        with self._folder(key, create=True) as (fd, parts), self._lock(fd, parts, key):
            _, current = self._read(fd, parts, key)
            if current != version:
                raise PreconditionFailed(f"{self.uri_for(key)} changed since it was read")
            publish(fd, parts[-1], lambda out: out.write(data))

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def link_for(self, key: str, expires_s: int = 0) -> str:
        return self._path(key).as_uri()
