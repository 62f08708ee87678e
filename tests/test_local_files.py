"""Local folders (a local store, this machine's cache): no symlink below their root is
followed, whatever it points to, and every file is published whole and durably."""
from __future__ import annotations

import json
import os
import stat

import pytest

import cnn.data as cd
from store import LocalStore, open_store
from registry import champions
from tests.contexts import run_context
from tests.judges import promote_by_accuracy

CAND = {"run_id": "r1", "model_uri": "runs/r1/model", "test": {"accuracy": 0.9, "loss": 0.1},
        "dataset_name": "cifar10", "dataset_md5": "m" * 32, "split_seed": 0, "test_size": 3500}


@pytest.fixture
def planted(tmp_path):
    """(a real store folder, a folder outside it that symlinks planted in the store point to)."""
    root, outside = tmp_path / "store", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside


def _everything_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- writes: a run's files and the champion never land outside the store ---

@pytest.mark.parametrize("link, write", [
    ("runs/r1", lambda s, src: s.put_file("runs/r1/report.md", src)),
    ("runs/r1", lambda s, src: s.put_bytes("runs/r1/manifest.json", b"{}", src.parent / "tmp")),
    ("runs", lambda s, src: s.put_file("runs/r1/variants/none/metrics.json", src)),
    ("champions", lambda s, src: s.write_if("champions/x.json", b"{}", None)),
    ("champions", lambda s, src: champions.promote(s, CAND, promote_by_accuracy(0.0))),
])
def test_a_write_through_a_symlinked_folder_is_refused(planted, link, write):
    root, outside = planted
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(outside, target_is_directory=True)
    src = root.parent / "report.md"
    src.write_text("# report")
    with pytest.raises(ValueError) as err:
        write(LocalStore(root), src)
    assert f"resolves to {outside}" in str(err.value) and f"outside {root}" in str(err.value)
    assert f"{root / link} is a symlink to {outside}" in str(err.value)  # the link and where it points
    assert _everything_in(outside) == []  # nothing written there, not even a lock or a temporary file


def test_a_write_over_a_symlinked_file_is_refused_and_the_target_kept(planted):
    root, outside = planted
    (outside / "champion.json").write_text("not yours")
    (root / "champions").mkdir()
    (root / "champions" / f"{champions.identity(CAND)}.json").symlink_to(outside / "champion.json")
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "report.md").symlink_to(outside / "report.md")  # dangling: would be created
    s = LocalStore(root)
    with pytest.raises(ValueError, match=f"runs/r1/report.md: .* is a symlink to {outside / 'report.md'}"):
        s.put_bytes("runs/r1/report.md", b"# report", root.parent / "tmp")
    with pytest.raises(ValueError, match=f"is a symlink to {outside / 'champion.json'}"):
        champions.promote(s, CAND, promote_by_accuracy(0.0))
    assert _everything_in(outside) == ["champion.json"] and (outside / "champion.json").read_text() == "not yours"


def test_a_symlink_inside_the_store_is_not_followed_either(planted):
    """Writes follow no symlink at all: one that stays inside is refused too, by name."""
    root, _ = planted
    (root / "runs" / "r0").mkdir(parents=True)
    (root / "runs" / "r1").symlink_to(root / "runs" / "r0")
    with pytest.raises(ValueError, match=f"goes through the symlink {root / 'runs' / 'r1'} -> {root / 'runs' / 'r0'}"):
        LocalStore(root).put_bytes("runs/r1/report.md", b"x", root.parent / "tmp")
    assert _everything_in(root / "runs" / "r0") == []


# --- reads: nothing outside the store is read or listed as if it were in it ---

def test_reads_through_a_symlink_are_refused_and_listing_skips_it(planted, tmp_path):
    root, outside = planted
    (outside / "secret.json").write_text('{"run_id": "planted"}')
    (outside / "report.md").write_text("planted")
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "report.md").write_text("mine")
    (root / "runs" / "r2").symlink_to(outside)  # a linked folder
    (root / "runs" / "r1" / "manifest.json").symlink_to(outside / "secret.json")  # a linked file
    s = LocalStore(root)
    with pytest.raises(ValueError, match=f"runs/r2/report.md: .* resolves to {outside / 'report.md'}"):
        s.get_file("runs/r2/report.md", tmp_path / "got.md")
    assert not (tmp_path / "got.md").exists()
    with pytest.raises(ValueError, match=f"{root / 'runs' / 'r1' / 'manifest.json'} is a symlink to {outside}"):
        s.read_versioned("runs/r1/manifest.json")
    with pytest.raises(ValueError, match="runs/r1/manifest.json: "):
        s.exists("runs/r1/manifest.json")
    assert s.list("runs") == ["runs/r1/report.md"] and s.list("") == ["runs/r1/report.md"]
    with pytest.raises(ValueError, match=f"runs/r2: .* resolves to {outside}"):
        s.list("runs/r2")


def test_a_prepared_dataset_in_a_symlinked_store_folder_is_refused(planted):
    """What the training tasks read by path (tasks/common.materialize) is checked too."""
    from run.cache import materialize

    root, outside = planted
    (root / "datasets").symlink_to(outside)
    with pytest.raises(ValueError, match=f"datasets/cifar10/{'a' * 32}.*resolves to {outside}"):
        materialize(open_store(str(root)), f"datasets/cifar10/{'a' * 32}", ["prepared.safetensors", "meta.json"])


def test_the_store_cache_does_not_write_a_prepared_dataset_through_a_symlink(s3_bucket, tmp_path, monkeypatch,
                                                                             synthetic_archive):
    """fetch-dataset with an S3 store copies the prepared tensors into this machine's cache
    (store-cache/); a symlink planted there does not send them elsewhere."""
    from tasks.data import fetch_dataset

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (cache / "store-cache").mkdir(parents=True)
    (cache / "store-cache" / "datasets").symlink_to(outside)
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(cache))
    path, md5 = synthetic_archive
    with pytest.raises(ValueError, match=f"datasets/cifar10/{md5}: .* resolves to {outside}/cifar10/{md5}.*, outside "
                                         f"{cache / 'store-cache'}"):
        fetch_dataset.fn(run_context(f"s3://{s3_bucket}", data_dir=str(path.parent), data_md5=md5))
    assert _everything_in(outside) == []


@pytest.mark.parametrize("folder", ["prepared/cifar10", "synthetic/train100-test50"])
def test_the_cache_does_not_prepare_or_generate_data_through_a_symlink(folder, tmp_path, monkeypatch, synthetic_archive):
    from tasks.data import fetch_dataset

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (cache / folder).parent.mkdir(parents=True)
    (cache / folder).symlink_to(outside)
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(cache))
    path, md5 = synthetic_archive
    source = ({"dataset": "synthetic", "synthetic_train": 100, "synthetic_test": 50} if folder.startswith("synthetic")
              else {"data_dir": str(path.parent), "data_md5": md5})
    with pytest.raises(ValueError, match=f"dataset: .* resolves to {outside}/.*, outside {cache / folder.split('/')[0]}"):
        fetch_dataset.fn(run_context(tmp_path / "store", **source))
    assert _everything_in(outside) == []


def test_a_run_folder_in_the_cache_is_checked_to_the_file(tmp_path, monkeypatch):
    from run.cache import local_run_dir

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "outside").mkdir()
    local_run_dir("r1").mkdir(parents=True)
    (local_run_dir("r1") / "variants").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match=f"run_id: .* resolves to {tmp_path / 'outside' / 'none'}"):
        local_run_dir("r1", "variants", "none")


def test_a_folder_swapped_for_a_symlink_after_it_was_opened_is_not_followed(planted):
    """Folders are held open while written in: a link swapped in after the check leads
    nowhere (what is written lands in the folder that was checked)."""
    from store.files import open_dir, publish

    root, outside = planted
    fd = open_dir(root, ["runs", "r1"], "runs/r1/report.md", create=True)
    try:
        (root / "runs" / "r1").rename(root / "runs" / "checked")
        (root / "runs" / "r1").symlink_to(outside)
        publish(fd, "report.md", lambda f: f.write(b"# report"))
    finally:
        os.close(fd)
    assert _everything_in(outside) == [] and (root / "runs" / "checked" / "report.md").read_bytes() == b"# report"


# --- durability: a file is published whole, and on disk before its name points to it ---

def test_prepare_interrupted_midway_leaves_the_old_meta_json(synthetic_archive, tmp_path, monkeypatch):
    path, md5 = synthetic_archive
    out = cd.prepare(path, md5, tmp_path / "prepared")
    before = (out / cd.PREPARED_META).read_bytes()
    # a character that cannot be written, midway through the document: the write fails part way
    monkeypatch.setattr(cd.json, "dumps", lambda obj, **kw: '{"md5": "\ud800", "classes": []}')
    with pytest.raises(UnicodeEncodeError):
        cd.prepare(path, md5, out)
    assert (out / cd.PREPARED_META).read_bytes() == before  # never a truncated meta.json
    assert sorted(p.name for p in out.iterdir()) == sorted([cd.PREPARED_FILE, cd.PREPARED_META])  # no temporary file left


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync made: 'file' or 'folder' (no power loss can be simulated; this shows
    both the data and the rename are flushed)."""
    done = []
    real = os.fsync

    def fsync(fd):
        done.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return done


def test_local_store_writes_are_fsynced_before_and_after_the_rename(tmp_path, fsyncs):
    s = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"abc")
    s.put_file("runs/r1/f", tmp_path / "f")
    s.put_bytes("runs/r1/g", b"abc", tmp_path / "tmp")
    s.write_if("champions/c.json", b"{}", None)
    assert fsyncs == ["file", "folder"] * 3


def test_prepare_and_the_synthetic_archive_are_fsynced(tmp_path, fsyncs):
    from cnn.synthetic import write_archive

    path, md5 = write_archive(tmp_path / "syn", n_train=50, n_test=20, seed=0)
    cd.prepare(path, md5, tmp_path / "prepared")
    assert fsyncs == ["file", "folder"] * 3  # the archive, the tensors, meta.json
    assert json.loads((tmp_path / "prepared" / cd.PREPARED_META).read_text())["md5"] == md5


@pytest.mark.slow
@pytest.mark.parametrize("link, target", [("runs/run-a/report.md", "report.md"), ("champions", "champions")])
def test_a_run_writes_neither_its_report_nor_the_champion_through_a_symlink(link, target, tmp_path, monkeypatch,
                                                                            prefect_harness, synthetic_archive):
    """A whole run, as the nightly makes it, into a store where someone planted a link."""
    from flows.train_cifar import train_cifar

    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    if target == "champions":
        (outside / target).mkdir()  # a folder the link leads to
    (store / link).parent.mkdir(parents=True)
    (store / link).symlink_to(outside / target)
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5 = synthetic_archive
    with pytest.raises(ValueError, match=f"{link}.*: .*{store / link} is a symlink to {outside / target}"):
        train_cifar(run_id="run-a", data_dir=str(path.parent), data_md5=md5, variants=["none"], epochs=1,
                    subset=300, store=str(store), device="cpu")
    assert _everything_in(outside) == ([] if target == "report.md" else ["champions"])  # as it was
    assert not (store / "runs" / "run-a" / "manifest.json").exists()
