"""The CIFAR reader, MD5 checks, the hold-out split and the prepared-data cache."""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from cnn import data as cd
from cnn.synthetic import write_archive


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
    first = fetch_dataset.fn("cifar10", str(path.parent), None, md5, 0, 0, str(tmp_path / "store"))
    assert first["md5"] == md5 and (tmp_path / "store" / "datasets" / "cifar10" / md5 / cd.PREPARED_FILE).is_file()

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cd, "decode", no_decode)
    second = fetch_dataset.fn("cifar10", str(path.parent), None, md5, 0, 0, str(tmp_path / "store"))
    assert second == first


def test_fetch_dataset_wrong_md5_stores_nothing(tmp_path, monkeypatch, synthetic_archive):
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, _ = synthetic_archive
    with pytest.raises(cd.DataError, match="MD5 mismatch"):
        fetch_dataset.fn("cifar10", str(path.parent), None, "f" * 32, 0, 0, str(tmp_path / "store"))
    assert not (tmp_path / "store" / "datasets").exists()
