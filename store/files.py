"""Local files for the local store, the run's caches and cnn/ (so no Store here).

- A symlink planted in a store or cache folder never leads a read, write, listing or
  lock out of it: no symlink below a root is followed; one met is refused, naming it.
  Folders are opened one at a time with O_NOFOLLOW, relative to the one above, so a
  link swapped in after a check is not followed either; only `beneath`, for paths
  handed on to torch or pandas, can be raced.
- A file is published whole or not at all, even across a power loss: written beside
  it, fsynced, renamed over it, and the folder fsynced (the rename is only durable
  once the folder is).
"""
from __future__ import annotations

import errno
import os
import stat
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """A path under a root goes through a symlink: bad input, never retried."""


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refused(root: Path, parts: Sequence[str], i: int, what: str) -> UnsafePath:
    path, link = root.joinpath(*parts), root.joinpath(*parts[: i + 1])
    try:
        target = os.readlink(link)
    except OSError:  # swapped again meanwhile: still a refusal
        target = "?"
    leads = path.resolve()
    if not leads.is_relative_to(root):
        return UnsafePath(f"{what}: {path} resolves to {leads}, outside {root} ({link} is a symlink to {target})")
    return UnsafePath(f"{what}: {path} goes through the symlink {link} -> {target}; "
                      f"no symlink below {root} is followed")


def _split(root: Path, path: str | Path, what: str) -> list[str]:
    """The parts of `path` below `root` (`path` relative to it, or absolute under it, as given or resolved)."""
    path = Path(path)
    if path.is_absolute():
        under = next((r for r in (Path(root), Path(root).resolve()) if path.is_relative_to(r)), None)
        if under is None:
            raise UnsafePath(f"{what}: {path} is outside {root}")
        path = path.relative_to(under)
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafePath(f"{what}: {path} climbs out of {root} ('..')")
    return parts


def open_dir(root: Path, parts: Sequence[str], what: str, create: bool = False,
             whole: Sequence[str] | None = None) -> int:
    """A descriptor of the folder root/parts, for the caller to close; created if `create`.
    A refusal names root/`whole`, the path that `parts` begin."""
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR)  # the root itself is the caller's choice (it may be a link to a big disk)
    try:
        for i, part in enumerate(parts):
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            try:
                nxt = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part):
                    raise _refused(root, whole or parts, i, what) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def no_link(dir_fd: int, root: Path, parts: Sequence[str], what: str) -> None:
    if parts and _is_link(dir_fd, parts[-1]):
        raise _refused(Path(root), parts, len(parts) - 1, what)


def open_file(dir_fd: int, root: Path, parts: Sequence[str], what: str, flags: int = os.O_RDONLY,
              mode: int = 0o666) -> int:
    try:
        return os.open(parts[-1], flags | _NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refused(Path(root), parts, len(parts) - 1, what) from None
        raise


def beneath(root: Path, path: str | Path, what: str) -> Path:
    """`path` as an absolute path, if no symlink below `root` is on its way."""
    parts = _split(root, path, what)
    root = Path(root).resolve()
    if not parts:
        return root
    try:
        fd = open_dir(root, parts[:-1], what, whole=parts)
    except (FileNotFoundError, NotADirectoryError):
        return root.joinpath(*parts)  # not there yet: nothing below can be a link
    try:
        no_link(fd, root, parts, what)
    finally:
        os.close(fd)
    return root.joinpath(*parts)


def _commit(dir_fd: int, tmp: str, name: str) -> None:
    fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    try:
        os.fsync(fd)  # its bytes on disk before the name points at them
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # a link at `name` is replaced, not followed
    os.fsync(dir_fd)


def _temp_name(name: str, suffix: str = "") -> str:
    # the leading dot keeps it out of listings and globs while it is incomplete
    return f".{name}.{uuid.uuid4().hex}.tmp{suffix}"


def publish(dir_fd: int, name: str, write: Callable[[BinaryIO], T]) -> T:
    """Write the file `name` in the folder `dir_fd` through `write(file)`, atomically and durably."""
    tmp = _temp_name(name)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=dir_fd),
                       "wb") as f:
            result = write(f)
        _commit(dir_fd, tmp, name)
        return result
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)  # only left when writing failed


@contextmanager
def publishing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for writers that want a path; on a clean exit it becomes
    `path` atomically and durably. `suffix` ends the temporary name (torch.export wants .pt2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, _DIR)
    tmp = _temp_name(path.name, suffix)
    try:
        yield path.parent / tmp
        _commit(folder, tmp, path.name)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        os.close(folder)


def write_durably(path: str | Path, data: bytes) -> Path:
    with publishing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
