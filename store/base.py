"""The object-store interface: keys are '/'-separated paths under the store's root.
Tasks use a store; `cnn/` never sees one."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from store.scrub import scrub

# so no run or variant name can climb out of its prefix; fullmatch, because `$` with
# match would let a trailing newline through
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StoreError(RuntimeError):
    """A store operation failed for a reason the user must fix (bucket, permissions)."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed (or appeared) since it was read."""


class StoreUnavailable(StoreError):
    """The store did not answer, even after the client's retries: worth trying again later."""


class StoreUnreachable(StoreUnavailable):
    """Nothing answered at all (refused, reset, timed out, no such name), unlike a 5xx."""


class StoreOutage(StoreError):
    """The store stayed unavailable for longer than the outage window: final."""


class TooLarge(ValueError):
    """Something another party wrote is larger than it can legitimately be: refused unread.
    `size`: in bytes, None where it was not known before reading."""

    def __init__(self, message: str, size: int | None = None):
        super().__init__(message)
        self.size = size


# documents are well under a few MB (a champion document grows ~4 KB per change)
MAX_DOCUMENT_BYTES = 16 << 20
# the largest model's checkpoint, optimizer state included, is tens of MB
MAX_MODEL_BYTES = 1 << 30


def json_object(raw: bytes, where: str, expected: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `raw`, or `error` naming `where`, what was `expected` and what was found."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: {expected}; found text that is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: {expected}; found a JSON {type(value).__name__}")
    return value


def check_size(where: str, size: int | None, limit: int, what: str) -> None:
    """Refuse `where` before reading it when its known `size` is above `limit`."""
    if size is not None and size > limit:
        raise TooLarge(f"{where}: {size:,} bytes, larger than {what} can be (limit {limit:,} bytes); refused", size)


def read_at_most(f: BinaryIO, limit: int, where: str, what: str) -> bytes:
    """Every read of something another party wrote goes through here, so a huge one is never
    held in memory: at most `limit + 1` bytes are read, whatever size was claimed."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{where}: larger than {what} can be (limit {limit:,} bytes); refused")
    return data


def safe_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _PART.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not a valid name: expected letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters, no '..')"
        )
    return value


def name_part(value: str) -> str:
    """A key part for a name someone else chose (a Prefect deployment's, which may hold
    spaces or dots): the name itself when it is already a safe name, else its safe
    characters and 8 hex digits of its SHA-256, so that two names never share a part."""
    if _PART.fullmatch(value) and ".." not in value:
        return value
    import hashlib

    kept = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-")[:100] or "name"
    return f"{kept}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def join_key(*parts: str) -> str:
    for p in parts:
        for piece in p.split("/"):
            if piece in ("", ".", "..") or "\\" in piece or _CONTROL.search(piece):
                raise ValueError(f"invalid store key part {piece!r} in {'/'.join(parts)!r}")
    return "/".join(parts)


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{scrub(repr(uri))}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{scrub(repr(uri))}: {scrub(repr(bucket))} is not a valid S3 bucket name "
                         "(3-63 lowercase letters, digits, '.' or '-')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            join_key(prefix)
        except ValueError as e:
            raise ValueError(f"{scrub(repr(uri))}: {e}") from None
    return bucket, prefix


def too_big(uri: str, limit: int, found: int) -> StoreError:
    return StoreError(f"{uri}: expected at most {limit:,} bytes, found {found:,}; not read")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Store(ABC):
    uri: str

    @abstractmethod
    def put_file(self, key: str, path: Path) -> dict:
        """Returns {"uri", "sha256", "bytes"}. Atomic per object."""

    @abstractmethod
    def get_file(self, key: str, path: Path, limit: int | None = None) -> Path:
        """FileNotFoundError if absent; an object over `limit` bytes is refused before it is downloaded."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, relative to the store root, sorted."""

    @abstractmethod
    def read_versioned(self, key: str, limit: int = MAX_DOCUMENT_BYTES) -> tuple[bytes | None, str | None]:
        """(content, version tag), or (None, None) if absent."""

    @abstractmethod
    def read_stamped(self, key: str, limit: int) -> tuple[bytes | None, str | None, float | None]:
        """(content, version tag, age) or Nones if absent. `age`: seconds since the store last
        wrote it, by the store's own clock, never a writer's."""

    @abstractmethod
    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        """Write only if `key` is still at `version` (None: only if absent), else PreconditionFailed."""

    @abstractmethod
    def uri_for(self, key: str) -> str: ...

    @abstractmethod
    def link_for(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A link a person can open."""

    def put_bytes(self, key: str, data: bytes, tmp_dir: Path) -> dict:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{key.replace('/', '__')}.{uuid.uuid4().hex}.upload"
        tmp.write_bytes(data)
        try:
            return self.put_file(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def put_json(self, key: str, obj, tmp_dir: Path) -> dict:
        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=False).encode(), tmp_dir)

    def read_json(self, key: str):
        data, _ = self.read_versioned(key)
        return None if data is None else json.loads(data)
