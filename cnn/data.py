"""CIFAR-10 data: find the archive, verify it, decode it once, split the hold-out.

The archive is checked (official MD5s, or one the user passes) before it is read,
every file through the bounded reader, and its pickles through `CifarUnpickler`, so
an archive from a mirror or a shared folder can neither run code nor exhaust memory.
Prepared tensors are cached under `<cache>/<archive-md5>/` and trusted only by their
`prepared_sha256`, computed from the verified archive.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file

from store.base import TooLarge, check_size, read_at_most
from store.files import publishing, write_durably

# The official archive as torchvision's CIFAR10 describes it (tests/test_data.py checks these
# against it). Written out so that a process that only reads prepared tensors, every flow
# run, does not import torchvision (about 1.5 s of CPU each).
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"}
TRAIN_FILES = list(TRAIN_MD5)
HOLDOUT_FILE = "test_batch"
META_FILE = "batches.meta"
META_KEY = "label_names"
# batches.meta too: its class names end up in every manifest and report
OFFICIAL_FILE_MD5 = {**TRAIN_MD5, HOLDOUT_FILE: "40351d587109b95175f43aff81a1287e",
                     META_FILE: "5ff9c542aee3614f3951f8cda6e48888"}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VAL_FRACTION = 0.65

PREPARED_FILE = "tensors.safetensors"
PREPARED_META = "meta.json"
PREPARED_MEMBERS = {"train_x": torch.uint8, "train_y": torch.int64, "holdout_x": torch.uint8,
                    "holdout_y": torch.int64}

# Anything another party wrote that is larger is refused unread. A batch of 10,000 images
# is 31 MB (RunParams keeps synthetic batches to that); the official archive 170 MB, 8 entries.
MAX_FILE_BYTES = 64 << 20
OFFICIAL_ARCHIVE_BYTES = 170_498_071
MAX_ARCHIVE_BYTES = 2 * OFFICIAL_ARCHIVE_BYTES
MAX_ARCHIVE_ENTRIES = 64
MAX_PREPARED_BYTES = 512 << 20
MAX_PREPARED_META_BYTES = 1 << 20


class DataError(ValueError):
    """A data file is missing, corrupt, or not what was expected."""


try:  # numpy 2 moved numpy.core to numpy._core; both names appear in CIFAR pickles
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}; only latin1 rebuilds bytes")
    return text.encode("latin1")


# What rebuilds a numpy array, nothing else: numpy.core (official, numpy 1.x) or numpy._core
# (numpy 2) names, _frombuffer for protocol 5, _codecs.encode for protocol 2 under Python 3.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside `_ALLOWED_GLOBALS`."""


class CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside `_ALLOWED_GLOBALS`, so a pickle cannot call os.system."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load_cifar_pickle(raw: bytes, member: str, source: Path):
    try:
        # latin1: the official files are Python 2 str pickles; numpy expects latin1 for their arrays
        return CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedGlobal as e:
        raise DataError(
            f"{source}: {member}: refused to unpickle global {e}: a CIFAR pickle holds only dicts, lists, "
            "strings, numbers and numpy arrays (is this file from a trusted source?)"
        ) from None
    except Exception as e:
        raise DataError(f"{source}: {member} is not a valid CIFAR pickle: {e}") from e


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`; a DataError, before reading, if it is larger than `limit`."""
    try:
        with open(path, "rb") as f:
            check_size(str(path), os.fstat(f.fileno()).st_size, limit, what)
            return read_at_most(f, limit, str(path), what)
    except TooLarge as e:
        raise DataError(str(e)) from None


@dataclass
class Splits:
    """The three splits, uint8 images (N, 3, 32, 32) and int64 labels (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def md5_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_cifar10(root: Path) -> Path:
    """Download the official archive into `root` (torchvision checks its MD5)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / ARCHIVE_NAME
    if path.exists() and md5_of(path) == ARCHIVE_MD5:
        return path
    from torchvision.datasets.utils import download_url

    try:
        download_url(ARCHIVE_URL, str(root), ARCHIVE_NAME, ARCHIVE_MD5)
    except Exception as e:
        raise DataError(
            f"could not download CIFAR-10 from {ARCHIVE_URL}: {e}. Without internet, "
            f"pass a local copy with --data-dir DIR (holding {ARCHIVE_NAME} or {BATCH_DIR}/), "
            "or train on generated data with --dataset synthetic"
        ) from e
    return path


def find_archive(data_dir: Path) -> Path:
    """The archive or extracted folder inside `data_dir` (or `data_dir` itself)."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / ARCHIVE_NAME, data_dir / BATCH_DIR):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return candidate
        if candidate.is_dir() and (candidate / HOLDOUT_FILE).is_file():
            return candidate
    raise DataError(
        f"--data-dir {data_dir}: expected {ARCHIVE_NAME} or a {BATCH_DIR}/ folder with "
        f"{', '.join(TRAIN_FILES)} and {HOLDOUT_FILE}; found "
        + (", ".join(sorted(p.name for p in data_dir.iterdir())) or "an empty folder")
        if data_dir.is_dir()
        else f"--data-dir {data_dir}: no such folder or archive"
    )


def _members_md5(members: dict[str, bytes]) -> str:
    """MD5 of the files concatenated in order, batches.meta too (its class names are data)."""
    h = hashlib.md5()
    for name in TRAIN_FILES + [HOLDOUT_FILE, META_FILE]:
        if name in members:
            h.update(members[name])
    return h.hexdigest()


def dataset_md5(path: Path) -> str:
    """The dataset's identity: the archive's MD5, or an extracted folder's `_members_md5`."""
    path = Path(path)
    if path.is_file():
        try:  # before hashing it: a huge file is refused at once, not hashed for minutes
            check_size(str(path), path.stat().st_size, MAX_ARCHIVE_BYTES, "a CIFAR-10 archive")
        except TooLarge as e:
            raise DataError(str(e)) from None
        return md5_of(path)
    for name in TRAIN_FILES + [HOLDOUT_FILE]:
        if not (path / name).is_file():
            raise DataError(f"{path}: missing {name}; expected {', '.join(TRAIN_FILES)} and {HOLDOUT_FILE}")
    return _members_md5(_folder_members(path))


def verify(path: Path, expected_md5: str | None) -> str:
    """The dataset MD5, checked against `expected_md5` or else the official MD5s."""
    path = Path(path)
    found = dataset_md5(path)
    if expected_md5 is not None:
        if found != expected_md5.lower():
            raise DataError(f"{path}: MD5 mismatch: expected {expected_md5} (--data-md5), found {found}")
        return found
    if path.is_file():
        if found != ARCHIVE_MD5:
            raise DataError(
                f"{path}: not the official CIFAR-10 archive: expected MD5 {ARCHIVE_MD5}, found {found}. "
                f"If this is your own CIFAR-format data, pass --data-md5 {found}"
            )
        return found
    members = _folder_members(path)  # bounded: read once more rather than held from dataset_md5
    for name, official in OFFICIAL_FILE_MD5.items():
        if name not in members:
            raise DataError(f"{path}: missing {name}, which the official CIFAR-10 folder holds "
                            f"(MD5 {official}). If this is your own CIFAR-format data, pass --data-md5 {found}")
        got = hashlib.md5(members[name]).hexdigest()
        if got != official:
            raise DataError(
                f"{path / name}: not the official CIFAR-10 file: expected MD5 {official}, found {got}. "
                f"If this is your own CIFAR-format data, pass --data-md5 {found}"
            )
    return found


def _folder_members(path: Path) -> dict[str, bytes]:
    return {n: read_bounded(path / n, MAX_FILE_BYTES, "a CIFAR file") for n in TRAIN_FILES + [HOLDOUT_FILE, META_FILE]
            if (path / n).is_file()}


def _read_members(path: Path, md5: str | None = None) -> dict[str, bytes]:
    """Raw bytes of the batch files; with `md5`, checked, so that a file swapped after
    `verify` is refused, not unpickled."""
    if path.is_dir():
        out = _folder_members(path)
        found = _members_md5(out)
    else:
        raw = read_bounded(path, MAX_ARCHIVE_BYTES, "a CIFAR-10 archive")  # once: hashed and unpacked (170 MB)
        found = hashlib.md5(raw).hexdigest()
        out = _tar_members(raw, path)
    if md5 is not None and found != md5:
        raise DataError(f"{path}: changed since it was verified: expected MD5 {md5}, found {found}")
    return out


def _tar_members(raw: bytes, path: Path) -> dict[str, bytes]:
    wanted = TRAIN_FILES + [HOLDOUT_FILE, META_FILE]
    out, where = {}, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            # each member refused by its header's size before it is read or skipped (gzip bomb)
            for count, member in enumerate(tar, 1):
                if count > MAX_ARCHIVE_ENTRIES:
                    raise DataError(f"{path}: more than {MAX_ARCHIVE_ENTRIES} entries (limit); a CIFAR-10 "
                                    "archive holds 8")
                name, at = Path(member.name).name, f"{path}: {member.name}"
                check_size(at, member.size, MAX_FILE_BYTES, "a CIFAR file")
                if member.isfile() and name in wanted:
                    if name in out:  # two candidates: which one is the data would be a guess
                        raise DataError(f"{path}: holds {name} twice ({where[name]} and {member.name}); "
                                        "expected one of each CIFAR file")
                    out[name] = read_at_most(tar.extractfile(member), MAX_FILE_BYTES, at, "a CIFAR file")
                    where[name] = member.name
    except TooLarge as e:
        raise DataError(str(e)) from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .tar.gz archive (truncated or corrupt?): {e}") from e
    return out


def _decode_batch(name: str, raw: bytes, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = load_cifar_pickle(raw, name, source)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{source}: {name}: expected a dict with 'data' and 'labels', found {keys}")
    try:
        data = torch.as_tensor(np.asarray(batch["data"]))
        labels = torch.as_tensor(list(batch["labels"]), dtype=torch.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: {name}: expected 'data' a uint8 array (N, 3072) and 'labels' a list of "
                        f"ints, found {type(batch['data']).__name__} and {type(batch['labels']).__name__} "
                        f"({e})") from None
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{source}: {name}: expected uint8 data of shape (N, 3072), found {data.dtype} {tuple(data.shape)}"
        )
    if len(labels) != len(data):
        raise DataError(f"{source}: {name}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{source}: {name}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.view(-1, 3, 32, 32).clone(), labels


def decode(path: Path, md5: str | None = None) -> dict[str, torch.Tensor | list[str]]:
    """Train/hold-out tensors and class names; with `md5`, the bytes must still have it."""
    path = Path(path)
    members = _read_members(path, md5)
    missing = [n for n in TRAIN_FILES + [HOLDOUT_FILE] if n not in members]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; found {', '.join(sorted(members)) or 'nothing'}")
    train = [_decode_batch(n, members[n], path) for n in TRAIN_FILES]
    hold_x, hold_y = _decode_batch(HOLDOUT_FILE, members[HOLDOUT_FILE], path)
    classes = CLASSES
    if META_FILE in members:
        classes = _class_names(load_cifar_pickle(members[META_FILE], META_FILE, path), path)
    return {
        "train_x": torch.cat([x for x, _ in train]),
        "train_y": torch.cat([y for _, y in train]),
        "holdout_x": hold_x,
        "holdout_y": hold_y,
        "classes": list(classes),
    }


def _class_names(meta, source: Path) -> list[str]:
    key = META_KEY
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        found = sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{source}: {META_FILE}: expected a dict with {key!r} a list of strings, found {found}")
    return names


def prepared_sha256(tensors: dict[str, torch.Tensor], classes: list[str]) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and class names, not of the file:
    safetensors' layout may change between versions."""
    layout = {k: [str(t.dtype), list(t.shape)] for k, t in tensors.items()}
    h = hashlib.sha256(json.dumps({"classes": classes, "tensors": layout}, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(tensors[k].contiguous().numpy())
    return h.hexdigest()


def prepare(path: Path, md5: str, out_dir: Path) -> Path:
    """Decode `path` into `out_dir`; each file written whole and durably or not at all
    (two runs may prepare at once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    decoded = decode(path, md5)
    tensors = {k: v.contiguous() for k, v in decoded.items() if isinstance(v, torch.Tensor)}
    with publishing(out_dir / PREPARED_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = {"md5": md5, "sha256": prepared_sha256(tensors, decoded["classes"]), "classes": decoded["classes"],
            "train": len(tensors["train_y"]), "holdout": len(tensors["holdout_y"])}
    write_durably(out_dir / PREPARED_META, json.dumps(meta, indent=2).encode())
    return out_dir


def read_prepared(prepared_dir: Path, sha256: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, class names), checked; a copy from a store is trusted by `sha256` only,
    never by its meta.json."""
    path = Path(prepared_dir) / PREPARED_FILE
    try:
        tensors = load_safetensors(read_bounded(path, MAX_PREPARED_BYTES, "a prepared CIFAR dataset"))
    except SafetensorError as e:
        raise DataError(f"{path}: not a readable safetensors file: {e}") from None
    meta_path = Path(prepared_dir) / PREPARED_META
    raw = read_bounded(meta_path, MAX_PREPARED_META_BYTES, "a dataset's meta.json")
    try:
        classes = json.loads(raw).get("classes")
    except (ValueError, AttributeError):
        classes = None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{meta_path}: expected a JSON object with 'classes', a list of class names")
    for part, images in (("train", "train_x"), ("holdout", "holdout_x")):
        labels = f"{part}_y"
        for member in (images, labels):
            t = tensors.get(member)
            if t is None or t.dtype != PREPARED_MEMBERS[member]:
                found = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise DataError(f"{path}: member {member!r}: expected {PREPARED_MEMBERS[member]}, found {found} "
                                f"(members: {', '.join(sorted(tensors)) or 'none'})")
        x, y = tensors[images], tensors[labels]
        if x.shape[1:] != (3, 32, 32) or y.shape != (len(x),):
            raise DataError(f"{path}: expected {images} (N, 3, 32, 32) and {labels} (N,), found "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
    if sha256 is not None:
        found = prepared_sha256(tensors, classes)
        if found != sha256:
            raise DataError(f"{path}: not what the verified archive decodes to: expected SHA-256 {sha256} (of the "
                            f"tensors and class names), found {found}; refused")
    return tensors, classes


def split_sizes(n: int) -> tuple[int, int]:
    """(validation, test) sizes of a hold-out of `n` images: 6,500 / 3,500 of 10,000."""
    n_val = round(n * VAL_FRACTION)
    return n_val, n - n_val


def split_holdout(n: int, seed: int, purged: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, test) indices into the hold-out of `n` images. The `purged` hold-out
    indices are dropped first, and the rest split as a hold-out of their own; with none
    purged, the split is the one it always was."""
    kept = torch.arange(n)
    if len(purged):
        drop = torch.as_tensor(list(purged), dtype=torch.int64)
        if drop.min() < 0 or drop.max() >= n:
            raise DataError(f"purged hold-out indices must lie in 0..{n - 1}, found {drop.min()}..{drop.max()}")
        mask = torch.ones(n, dtype=torch.bool)
        mask[drop] = False
        kept = kept[mask]
    perm = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))]
    n_val, _ = split_sizes(len(kept))
    # sorted so that evaluation order is the file order, never shuffled
    return perm[:n_val].sort().values, perm[n_val:].sort().values


def load_splits(prepared_dir: Path, split_seed: int, subset: int | None = None, sha256: str | None = None,
                purged: Sequence[int] = ()) -> Splits:
    """`subset` caps the training images; the `purged` hold-out indices are in neither
    validation nor test (split_holdout)."""
    tensors, classes = read_prepared(prepared_dir, sha256)
    val_idx, test_idx = split_holdout(len(tensors["holdout_y"]), split_seed, purged)
    train_x, train_y = tensors["train_x"], tensors["train_y"]
    if subset is not None and subset < len(train_y):
        # a seeded, class-balanced-in-expectation sample (same seed as the split)
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(split_seed))[:subset]
        train_x, train_y = train_x[keep.sort().values], train_y[keep.sort().values]
    hx, hy = tensors["holdout_x"], tensors["holdout_y"]
    return Splits(train_x, train_y, hx[val_idx], hy[val_idx], hx[test_idx], hy[test_idx], classes)
