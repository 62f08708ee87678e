"""The CIFAR reader, MD5 checks, the hold-out split and the prepared-data cache."""
from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn import data as cd
from cnn.synthetic import write_archive
from tests.contexts import run_context


def _extract(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / cd.BATCH_DIR


def _archive_with(tmp_path, members: dict[str, bytes]):
    path = tmp_path / cd.ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{cd.BATCH_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _batch(n, shape=(3072,), dtype=np.uint8):
    return pickle.dumps({"data": np.zeros((n, *shape), dtype), "labels": [i % 10 for i in range(n)]})


def test_the_official_archive_is_the_one_torchvision_describes():
    from torchvision.datasets import CIFAR10

    assert (cd.ARCHIVE_NAME, cd.ARCHIVE_MD5, cd.ARCHIVE_URL, cd.BATCH_DIR) == \
        (CIFAR10.filename, CIFAR10.tgz_md5, CIFAR10.url, CIFAR10.base_folder)
    assert cd.TRAIN_FILES == [name for name, _ in CIFAR10.train_list]
    assert cd.HOLDOUT_FILE == CIFAR10.test_list[0][0]
    assert (cd.META_FILE, cd.META_KEY) == (CIFAR10.meta["filename"], CIFAR10.meta["key"])
    assert cd.OFFICIAL_FILE_MD5 == dict(CIFAR10.train_list + CIFAR10.test_list
                                        + [(CIFAR10.meta["filename"], CIFAR10.meta["md5"])])


def test_a_flow_run_reads_data_without_importing_torchvision():
    import subprocess
    import sys

    code = "import sys, cnn.data, flows.train_cifar; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_reads_archive_and_counts_images_from_the_files(tmp_path):
    path, md5 = write_archive(tmp_path, n_train=1003, n_test=211, seed=3)
    assert cd.verify(path, md5) == md5
    d = cd.decode(path)
    assert d["train_x"].shape == (1003, 3, 32, 32) and d["train_x"].dtype == torch.uint8
    assert d["holdout_x"].shape == (211, 3, 32, 32)
    assert d["train_y"].dtype == torch.int64 and set(d["train_y"].tolist()) <= set(range(10))
    assert d["classes"] == cd.CLASSES


def test_reads_extracted_folder_same_as_archive(tmp_path):
    path, _ = write_archive(tmp_path / "a", n_train=500, n_test=100)
    folder = _extract(path, tmp_path / "x")
    assert cd.find_archive(tmp_path / "x") == folder
    md5 = cd.dataset_md5(folder)
    assert cd.verify(folder, md5) == md5
    a, b = cd.decode(path), cd.decode(folder)
    assert torch.equal(a["train_x"], b["train_x"]) and torch.equal(a["holdout_y"], b["holdout_y"])


def test_wrong_md5_names_file_expected_and_found(tmp_path):
    path, md5 = write_archive(tmp_path, n_train=100, n_test=20)
    with pytest.raises(cd.DataError) as e:
        cd.verify(path, "0" * 32)
    assert str(path) in str(e.value) and "0" * 32 in str(e.value) and md5 in str(e.value)


def test_non_official_archive_without_md5_is_refused(tmp_path):
    path, md5 = write_archive(tmp_path, n_train=100, n_test=20)
    with pytest.raises(cd.DataError, match=f"expected MD5 {cd.ARCHIVE_MD5}, found {md5}.*--data-md5"):
        cd.verify(path, None)


def test_non_official_folder_without_md5_names_the_file(tmp_path):
    path, _ = write_archive(tmp_path / "a", n_train=100, n_test=20)
    folder = _extract(path, tmp_path / "x")
    with pytest.raises(cd.DataError, match="data_batch_1: not the official CIFAR-10 file"):
        cd.verify(folder, None)


def test_truncated_archive(tmp_path):
    path, _ = write_archive(tmp_path, n_train=200, n_test=40)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(cd.DataError, match="truncated or corrupt"):
        cd.decode(cut)


def test_bad_pickle_and_wrong_shapes(tmp_path):
    good = {n: _batch(10) for n in cd.TRAIN_FILES + [cd.HOLDOUT_FILE]}
    (tmp_path / "p").mkdir()
    bad = _archive_with(tmp_path / "p", {**good, "data_batch_3": b"not a pickle"})
    with pytest.raises(cd.DataError, match="data_batch_3 is not a valid CIFAR pickle"):
        cd.decode(bad)
    (tmp_path / "s").mkdir()
    shaped = _archive_with(tmp_path / "s", {**good, cd.HOLDOUT_FILE: _batch(10, shape=(1024,))})
    with pytest.raises(cd.DataError, match=r"test_batch: expected uint8 data of shape \(N, 3072\), found torch.uint8 \(10, 1024\)"):
        cd.decode(shaped)



@pytest.mark.parametrize("batch, found", [
    ({"data": ["a"] * 10, "labels": list(range(10))}, "list and list"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": ["cat"] * 10}, "ndarray and list"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": 5}, "ndarray and int"),
    ({b"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10}, "found [\"b'data'\", 'labels']"),
])
def test_a_batch_of_the_wrong_types_is_refused_naming_it(batch, found, tmp_path):
    good = {n: _batch(10) for n in cd.TRAIN_FILES + [cd.HOLDOUT_FILE]}
    bad = _archive_with(tmp_path, {**good, "data_batch_2": pickle.dumps(batch)})
    with pytest.raises(cd.DataError, match="data_batch_2: expected") as e:
        cd.decode(bad)
    assert found in str(e.value), e.value

def test_missing_batch_file(tmp_path):
    members = {n: _batch(5) for n in cd.TRAIN_FILES[:-1] + [cd.HOLDOUT_FILE]}
    with pytest.raises(cd.DataError, match="missing data_batch_5"):
        cd.decode(_archive_with(tmp_path, members))


def test_missing_data_dir_contents(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(cd.DataError, match="expected cifar-10-python.tar.gz.*found readme.txt"):
        cd.find_archive(tmp_path)


@pytest.mark.parametrize("n,val,test", [(10000, 6500, 3500), (1000, 650, 350), (401, 261, 140)])
def test_split_sizes_disjoint_sorted(n, val, test):
    v, t = cd.split_holdout(n, seed=0)
    assert (len(v), len(t)) == (val, test)
    assert set(v.tolist()).isdisjoint(t.tolist()) and len(set(v.tolist()) | set(t.tolist())) == n
    assert torch.equal(v, v.sort().values) and torch.equal(t, t.sort().values)  # file order, never shuffled


def test_split_is_deterministic_by_seed():
    assert torch.equal(cd.split_holdout(1000, 1)[0], cd.split_holdout(1000, 1)[0])
    assert not torch.equal(cd.split_holdout(1000, 1)[0], cd.split_holdout(1000, 2)[0])


def test_synthetic_archive_is_deterministic(tmp_path):
    a = write_archive(tmp_path / "a", 300, 50, seed=7)
    b = write_archive(tmp_path / "b", 300, 50, seed=7)
    c = write_archive(tmp_path / "c", 300, 50, seed=8)
    assert a[1] == b[1] != c[1]
    with gzip.open(a[0]) as f:  # it is a gzip'd tar like the official one
        assert tarfile.open(fileobj=f).getnames()[0].startswith(cd.BATCH_DIR)


def test_prepare_and_load_splits(prepared_dir):
    s = cd.load_splits(prepared_dir, split_seed=0)
    assert s.sizes == {"train": 2000, "val": 260, "test": 140}
    assert s.val_x.dtype == torch.uint8 and s.val_x.shape[1:] == (3, 32, 32)
    assert cd.load_splits(prepared_dir, split_seed=0, subset=500).sizes["train"] == 500


def test_fetch_dataset_prepares_once(tmp_path, monkeypatch, synthetic_archive):
    """A second fetch of the same archive reuses the store's prepared copy: no decode."""
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    first = fetch_dataset.fn(run_context(tmp_path / "store", data_dir=str(path.parent), data_md5=md5))
    assert first.md5 == md5 and (tmp_path / "store" / "datasets" / "cifar10" / md5 / cd.PREPARED_FILE).is_file()

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cd, "decode", no_decode)
    second = fetch_dataset.fn(run_context(tmp_path / "store", data_dir=str(path.parent), data_md5=md5))
    assert second == first


def test_fetch_dataset_wrong_md5_stores_nothing(tmp_path, monkeypatch, synthetic_archive):
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, _ = synthetic_archive
    with pytest.raises(cd.DataError, match="MD5 mismatch"):
        fetch_dataset.fn(run_context(tmp_path / "store", data_dir=str(path.parent), data_md5="f" * 32))
    assert not (tmp_path / "store" / "datasets").exists()


# --- trust boundary: a CIFAR pickle cannot run code (issue 10) ---

class _Touch:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Py2Pickler(pickle._Pickler):
    """Writes a batch the way the official files were written (Python 2 cPickle, numpy 1.x):
    strings as byte strings, arrays through numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is cd._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        else:
            super().save_global(obj, name)


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _globals_in(raw: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


def test_reads_batches_pickled_like_the_official_ones(tmp_path):
    """The official files name numpy.core.multiarray (not numpy 2's numpy._core) and hold
    Python 2 byte strings; the restricted unpickler must still read them."""
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    batch = _py2_pickle({"batch_label": "training batch 1 of 5", "data": data, "labels": [3, 1, 4, 1]})
    meta = _py2_pickle({"label_names": cd.CLASSES, "num_cases_per_batch": 4, "num_vis": 3072})
    assert _globals_in(batch) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    members = {n: batch for n in cd.TRAIN_FILES + [cd.HOLDOUT_FILE]} | {cd.META_FILE: meta}
    d = cd.decode(_archive_with(tmp_path, members))
    assert torch.equal(d["holdout_x"].reshape(4, 3072), torch.from_numpy(data))
    assert d["holdout_y"].tolist() == [3, 1, 4, 1] and d["classes"] == cd.CLASSES


def test_synthetic_batches_need_only_allowed_globals(synthetic_archive):
    path, _ = synthetic_archive
    with tarfile.open(path) as tar:
        raw = tar.extractfile(f"{cd.BATCH_DIR}/data_batch_1").read()
    assert _globals_in(raw) <= {f"{m}.{n}" for m, n in cd._ALLOWED_GLOBALS}


@pytest.mark.parametrize("member", [cd.META_FILE, "data_batch_2"])
def test_a_pickle_payload_is_refused_naming_member_and_global(member, tmp_path, monkeypatch):
    """An archive whose batches.meta or a data batch would create a file when unpickled:
    its MD5 is the one the user gives (so the checksum passes), and the unpickler stops it."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"label_names": _Touch(marker)} if member == cd.META_FILE
                           else {"data": _Touch(marker), "labels": [0]})
    pickle.loads(payload)  # the attack is real: plain pickle creates the marker
    assert marker.exists()
    marker.unlink()

    members = {n: _batch(10) for n in cd.TRAIN_FILES + [cd.HOLDOUT_FILE]} | {cd.META_FILE: pickle.dumps(
        {"label_names": cd.CLASSES})} | {member: payload}
    (tmp_path / "data").mkdir()
    archive = _archive_with(tmp_path / "data", members)
    md5 = cd.md5_of(archive)

    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cd.DataError) as e:
        fetch_dataset.fn(run_context(tmp_path / "store", data_dir=str(archive.parent), data_md5=md5))
    assert f"{archive}: {member}: refused to unpickle global io.open" in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "store" / "datasets").exists()

    folder = tmp_path / "x"  # the same files extracted: refused the same way
    _extract(archive, folder)
    with pytest.raises(cd.DataError, match=f"{member}: refused to unpickle global io.open"):
        cd.decode(folder / cd.BATCH_DIR, cd.dataset_md5(folder / cd.BATCH_DIR))
    assert not marker.exists()


def test_folder_identity_and_official_check_cover_batches_meta(tmp_path, monkeypatch):
    """For an extracted folder, batches.meta is part of the MD5 the user gives, and of the
    official per-file check; a file swapped after the check is not decoded."""
    path, _ = write_archive(tmp_path / "a", n_train=100, n_test=20)
    folder = _extract(path, tmp_path / "x")
    md5 = cd.dataset_md5(folder)
    official = {n: cd.md5_of(folder / n) for n in cd.OFFICIAL_FILE_MD5}
    monkeypatch.setattr(cd, "OFFICIAL_FILE_MD5", official)  # pretend these are the official files
    assert cd.verify(folder, None) == md5 == cd.verify(folder, md5)

    (folder / cd.META_FILE).write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    assert cd.dataset_md5(folder) != md5
    with pytest.raises(cd.DataError, match=f"MD5 mismatch: expected {md5}"):
        cd.verify(folder, md5)
    with pytest.raises(cd.DataError, match=f"{cd.META_FILE}: not the official CIFAR-10 file: "
                                           f"expected MD5 {official[cd.META_FILE]}"):
        cd.verify(folder, None)
    with pytest.raises(cd.DataError, match=f"changed since it was verified: expected MD5 {md5}"):
        cd.decode(folder, md5)
    (folder / cd.META_FILE).unlink()
    with pytest.raises(cd.DataError, match=f"missing {cd.META_FILE}, which the official CIFAR-10 folder holds"):
        cd.verify(folder, None)


def test_official_meta_md5_is_torchvisions():
    from torchvision.datasets import CIFAR10

    assert cd.OFFICIAL_FILE_MD5[cd.META_FILE] == CIFAR10.meta["md5"] == "5ff9c542aee3614f3951f8cda6e48888"


def test_an_archive_holding_a_file_twice_is_refused(tmp_path):
    """Two batches.meta in one archive: which one is the data would be a guess."""
    meta = pickle.dumps({"label_names": list("abcdefghij")})
    path = _archive_with(tmp_path, {n: _batch(5) for n in cd.TRAIN_FILES + [cd.HOLDOUT_FILE]}
                         | {cd.META_FILE: meta, f"../other/{cd.META_FILE}": meta})
    with pytest.raises(cd.DataError, match=f"holds {cd.META_FILE} twice .*other/{cd.META_FILE}"):
        cd.decode(path)


def test_official_archive_check_covers_batches_meta(tmp_path, monkeypatch):
    """The official archive's MD5 covers every member: a changed batches.meta is refused."""
    path, md5 = write_archive(tmp_path / "a", n_train=100, n_test=20)
    monkeypatch.setattr(cd, "ARCHIVE_MD5", md5)  # pretend this is the official archive
    assert cd.verify(path, None) == md5
    with tarfile.open(path) as tar:
        members = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()}
    members[cd.META_FILE] = pickle.dumps({"label_names": list("abcdefghij")}, protocol=2)
    (tmp_path / "b").mkdir()
    changed = _archive_with(tmp_path / "b", members)
    with pytest.raises(cd.DataError, match=f"not the official CIFAR-10 archive: expected MD5 {md5}"):
        cd.verify(changed, None)


# --- trust boundary: a data source's key stays inside the download cache (issue 10) ---

def test_fetch_refuses_a_data_source_outside_the_cache(tmp_path, monkeypatch):
    """The task checks the key itself (it may be called without RunParams), and a symlink
    planted in the cache cannot lead a download (or its deletion) elsewhere."""
    from run.context import RunContext
    from run.params import RunParams
    from tasks.data import fetch_dataset

    def unchecked(data_source: str) -> RunContext:  # parameters RunParams would refuse first
        return RunContext(RunParams.model_construct(data_source=data_source, data_md5="0" * 32,
                                                    store=str(tmp_path / "store")), "r")

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="data_source: 's3://bucket/../../../victim': invalid store key part"):
        fetch_dataset.fn(unchecked("s3://bucket/../../../victim"))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / "bucket").symlink_to(tmp_path)
    with pytest.raises(ValueError, match=f"data_source: .* resolves to {victim}, outside "):
        fetch_dataset.fn(unchecked("s3://bucket/victim"))
    assert victim.read_text() == "keep me"


def test_a_bad_download_is_deleted_and_fetched_again(s3_bucket, tmp_path, monkeypatch, synthetic_archive):
    """Only what this call downloaded is deleted; a cached copy is reused only with the right MD5."""
    from store import open_store
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    mirror = open_store(f"s3://{s3_bucket}")
    (tmp_path / "junk.tar.gz").write_bytes(b"not the archive")
    mirror.put_file("m/a.tar.gz", tmp_path / "junk.tar.gz")
    local = tmp_path / "cache" / "downloads" / s3_bucket / "m" / "a.tar.gz"
    ctx = run_context(tmp_path / "store", data_source=f"s3://{s3_bucket}/m/a.tar.gz", data_md5=md5)
    with pytest.raises(cd.DataError, match=f"--data-source s3://{s3_bucket}/m/a.tar.gz: .*MD5 mismatch"):
        fetch_dataset.fn(ctx)
    assert not local.exists()  # downloaded by this call, so deleted

    mirror.put_file("m/a.tar.gz", path)  # the mirror is fixed; a stale copy in the cache is replaced
    local.write_bytes(b"stale")
    assert fetch_dataset.fn(ctx).md5 == md5 and cd.md5_of(local) == md5


# --- bounded reads: nothing another party wrote is read whole before its size is checked (issue 16) ---

GiB = 1 << 30


def _gzip_bomb(path: Path, member: str, size: int) -> Path:
    """A .tar.gz whose `member` inflates to `size` zero bytes: the tar stream written as
    concatenated gzip members, one compressed 64 MiB block of zeros repeated, so the bomb
    is ~1/1000 of `size` on disk and never more than 64 MiB in this process's memory."""
    block = 64 << 20
    zeros = gzip.compress(bytes(block), compresslevel=9, mtime=0)
    info = tarfile.TarInfo(f"{cd.BATCH_DIR}/{member}")
    info.size = size
    with open(path, "wb") as f:
        f.write(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
        for _ in range(size // block):
            f.write(zeros)
        f.write(gzip.compress(bytes(size % block + 2 * tarfile.BLOCKSIZE), mtime=0))  # rest, then end of archive
    return path


def _capped_memory(limit: int):
    """For a child process: an address-space cap, so that an unbounded read there ends in
    MemoryError instead of taking this machine's memory (imports alone reserve ~3.5 GB)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_gzip_bomb_is_refused_by_the_mirror_naming_the_member_and_limit(tmp_path, s3_bucket):
    """A 3 MB archive whose data_batch_1 inflates to 3 GiB: `python -m cli.mirror` refuses it
    by the member's size before reading it, naming the member and the limit; nothing is uploaded."""
    import os
    import subprocess
    import sys

    from tests.s3_fixtures import aws_client, aws_env

    bomb = _gzip_bomb(tmp_path / cd.ARCHIVE_NAME, "data_batch_1", 3 * GiB)
    assert bomb.stat().st_size < 4 << 20
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "cli.mirror", str(bomb), f"s3://{s3_bucket}/bomb/"],
                          cwd=root, env={**os.environ, **aws_env(), "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300, preexec_fn=_capped_memory(6 * GiB))
    assert proc.returncode == 1, proc.stderr
    assert (f"error: {bomb}: {cd.BATCH_DIR}/data_batch_1: 3,221,225,472 bytes, larger than a CIFAR file can be "
            f"(limit {cd.MAX_FILE_BYTES:,} bytes); refused") in proc.stderr, proc.stderr
    assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr
    assert "Contents" not in aws_client().list_objects_v2(Bucket=s3_bucket, Prefix="bomb/")


def test_a_huge_batch_file_in_a_data_folder_is_refused_before_its_md5(tmp_path, monkeypatch, synthetic_archive):
    """A data folder (--data-dir) whose data_batch_1 is 3 GiB (a sparse file: no disk used)
    is refused naming the file and the limit, not read whole to check its MD5."""
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    folder = _extract(synthetic_archive[0], tmp_path / "data")
    with open(folder / "data_batch_1", "r+b") as f:
        f.truncate(3 * GiB)
    with pytest.raises(cd.DataError) as err:
        fetch_dataset.fn(run_context(tmp_path / "store", data_dir=str(folder), data_md5="0" * 32))
    assert str(err.value) == (f"{folder / 'data_batch_1'}: 3,221,225,472 bytes, larger than a CIFAR file can be "
                              f"(limit {cd.MAX_FILE_BYTES:,} bytes); refused")
    assert not (tmp_path / "store" / "datasets").exists()


def test_an_s3_mirror_object_larger_than_an_archive_is_refused_before_download(s3_bucket, tmp_path, monkeypatch,
                                                                              synthetic_archive):
    """--data-source naming an object larger than a CIFAR-10 archive can be is refused by
    its size (HEAD), naming the URI, the size and the limit; nothing is downloaded."""
    from store import open_store
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cd, "MAX_ARCHIVE_BYTES", 1 << 20)  # the test's archive (a few MB) stands in for a huge one
    path, md5 = synthetic_archive
    open_store(f"s3://{s3_bucket}").put_file("big/a.tar.gz", path)
    uri = f"s3://{s3_bucket}/big/a.tar.gz"
    with pytest.raises(cd.DataError) as err:
        fetch_dataset.fn(run_context(tmp_path / "store", data_source=uri, data_md5=md5))
    assert str(err.value) == (f"--data-source {uri}: {uri}: {path.stat().st_size:,} bytes, larger than this download "
                              f"can be (limit {1 << 20:,} bytes); refused (the official CIFAR-10 archive is "
                              f"{cd.OFFICIAL_ARCHIVE_BYTES:,} bytes)")
    assert not any((tmp_path / "cache" / "downloads").rglob("*.gz*"))


# --- the store's prepared copy is trusted by the SHA-256 the run derived from the verified archive ---

def _poison(folder: Path, kind: str) -> None:
    """Rewrite a prepared copy as a store writer could: labels shifted by one class, or a
    member missing; meta.json rewritten to match (it is in the writer's reach too)."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / cd.PREPARED_FILE))
    if kind == "labels shifted":
        tensors["train_y"] = (tensors["train_y"] + 1) % 10
    else:
        del tensors["train_x"]
    save_file(tensors, str(folder / cd.PREPARED_FILE))
    meta = json.loads((folder / cd.PREPARED_META).read_text())
    if "train_x" in tensors:
        meta["sha256"] = cd.prepared_sha256(tensors, meta["classes"])
    (folder / cd.PREPARED_META).write_text(json.dumps(meta))


@pytest.mark.parametrize("kind, refused", [
    ("labels shifted", "not what the verified archive decodes to: expected SHA-256 {good} (of the tensors and "
                       "class names), found {bad}; refused"),
    ("train_x missing", "member 'train_x': expected torch.uint8, found nothing (members: holdout_x, holdout_y, "
                        "train_y)"),
])
def test_a_poisoned_prepared_copy_is_refused_by_a_unit_and_prepared_again_by_the_run(
        kind, refused, tmp_path, monkeypatch, synthetic_archive):
    from store import open_store
    from flows.train_variant import train_variant
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    ctx = run_context(tmp_path / "store", data_dir=str(path.parent), data_md5=md5)
    ds = fetch_dataset.fn(ctx)
    stored = tmp_path / "store" / ds.key
    good_y = cd.read_prepared(stored, ds.sha256)[0]["train_y"]
    _poison(stored, kind)
    bad = cd.prepared_sha256(*cd.read_prepared(stored, None)) if kind == "labels shifted" else None

    # a unit of the run (a child flow run gets the SHA-256 as a parameter) refuses it before training
    with pytest.raises(cd.DataError) as err:
        train_variant.fn(run_id="r1", variant="none", dataset_key=ds.key, dataset_md5=md5,
                         dataset_sha256=ds.sha256, store=str(tmp_path / "store"), epochs=1, device="cpu")
    assert str(err.value) == f"{stored / cd.PREPARED_FILE}: " + refused.format(good=ds.sha256, bad=bad)
    assert not any((tmp_path / "store" / "runs").rglob("metrics.json"))

    # the next run's fetch finds the mismatch and prepares the copy again from the archive
    assert fetch_dataset.fn(ctx) == ds
    assert torch.equal(cd.read_prepared(stored, ds.sha256)[0]["train_y"], good_y)
    assert open_store(str(tmp_path / "store")).exists(f"{ds.key}/{cd.PREPARED_FILE}")


def test_a_poisoned_copy_in_s3_is_prepared_again_and_a_stale_download_dropped(s3_bucket, tmp_path, monkeypatch,
                                                                             synthetic_archive):
    """The same through the real S3 endpoint: the run checks the store's object, not a copy
    this machine downloaded before; units then load the repaired copy."""
    from store import open_store
    from tasks.data import fetch_dataset, load_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    uri = f"s3://{s3_bucket}/poisoned"
    ctx = run_context(uri, data_dir=str(path.parent), data_md5=md5)
    ds = fetch_dataset.fn(ctx)
    st = open_store(uri)
    bad = tmp_path / "bad"
    for f in (cd.PREPARED_FILE, cd.PREPARED_META):
        st.get_file(f"{ds.key}/{f}", bad / f)
    _poison(bad, "labels shifted")
    st.put_file(f"{ds.key}/{cd.PREPARED_FILE}", bad / cd.PREPARED_FILE)
    st.put_file(f"{ds.key}/{cd.PREPARED_META}", bad / cd.PREPARED_META)

    assert fetch_dataset.fn(ctx) == ds
    st.get_file(f"{ds.key}/{cd.PREPARED_FILE}", tmp_path / "now" / cd.PREPARED_FILE)
    st.get_file(f"{ds.key}/{cd.PREPARED_META}", tmp_path / "now" / cd.PREPARED_META)
    cd.read_prepared(tmp_path / "now", ds.sha256)  # the store holds the right tensors again
    assert load_dataset(st, ds, 0).sizes["train"] == ds.train


def test_an_oversized_prepared_copy_in_s3_is_refused_before_it_is_downloaded(s3_bucket, tmp_path, monkeypatch,
                                                                            synthetic_archive):
    """A planted prepared copy larger than prepared tensors can be never reaches this
    machine's disk: refused by a unit naming the object and the limit, prepared again by the run."""
    from store import open_store
    from tasks.data import fetch_dataset, load_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    uri = f"s3://{s3_bucket}/oversized"
    ctx = run_context(uri, data_dir=str(path.parent), data_md5=md5)
    ds = fetch_dataset.fn(ctx)
    st = open_store(uri)
    limit, real = 64 << 10, cd.MAX_PREPARED_BYTES  # 512 MiB scaled down, so the planted object stays small
    monkeypatch.setattr(cd, "MAX_PREPARED_BYTES", limit)
    (tmp_path / "big").write_bytes(b"\0" * (limit + 1))
    st.put_file(f"{ds.key}/{cd.PREPARED_FILE}", tmp_path / "big")
    cached = tmp_path / "cache" / "store-cache" / ds.key / cd.PREPARED_FILE
    cached.unlink(missing_ok=True)

    with pytest.raises(cd.DataError, match=f"^{re.escape(st.uri_for(ds.key))}/{cd.PREPARED_FILE}: "
                                           f"{limit + 1:,} bytes, .*limit {limit:,} bytes"):
        load_dataset(st, ds, 0)
    assert not cached.exists()
    monkeypatch.setattr(cd, "MAX_PREPARED_BYTES", real)  # the run's fetch repairs the copy
    assert fetch_dataset.fn(ctx) == ds
    assert load_dataset(st, ds, 0).sizes["train"] == ds.train


def test_prepared_sha256_is_the_same_for_the_same_archive(tmp_path, synthetic_archive):
    """Preparing is deterministic: two machines derive the same SHA-256 from one archive."""
    import json

    path, md5 = synthetic_archive
    a, b = (json.loads((cd.prepare(path, md5, tmp_path / d) / cd.PREPARED_META).read_text()) for d in "ab")
    assert a["sha256"] == b["sha256"] and len(a["sha256"]) == 64
