"""purge_test_duplicates: the hold-out images with a near-duplicate in train are dropped
before the split, the same in every split the run makes; the dataset identity changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnn import data as cd
from cnn import datachecks as dc
from registry import champions
from run.records import DatasetRef, purged_tag
from tests.test_data_checks import _images, _plant, _write_archive

CPU = torch.device("cpu")


def test_without_purged_images_the_split_is_the_one_it_always_was():
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(7))
    val, test = cd.split_holdout(1000, 7)
    assert val.tolist() == perm[:650].sort().values.tolist() and test.tolist() == perm[650:].sort().values.tolist()
    assert [t.tolist() for t in cd.split_holdout(1000, 7, ())] == [val.tolist(), test.tolist()]


def test_purged_images_are_in_neither_validation_nor_test():
    purged = [0, 5, 17, 400, 999]
    val, test = cd.split_holdout(1000, 7, purged)
    assert (len(val), len(test)) == cd.split_sizes(995)
    assert not set(purged) & (set(val.tolist()) | set(test.tolist()))
    assert set(val.tolist()) | set(test.tolist()) == set(range(1000)) - set(purged)
    with pytest.raises(cd.DataError, match="purged hold-out indices must lie in 0..999"):
        cd.split_holdout(1000, 7, [1000])


def test_the_purged_hold_out_is_found_against_the_whole_hold_out():
    train_x, _ = _images(2000, 21)
    hold_x, _ = _images(400, 22)
    _, dst, _ = _plant(train_x, hold_x, 20, seed=23)
    purged = dc.holdout_near_duplicates(torch.from_numpy(train_x), torch.from_numpy(hold_x), CPU)
    assert purged == sorted(purged) and len(set(purged) & set(dst.tolist())) >= 18
    assert len(set(purged) - set(dst.tolist())) <= 1


def test_a_purged_hold_out_is_another_dataset_identity():
    ds = DatasetRef(name="cifar10", md5="a" * 32, key="k", sha256="b" * 64, holdout=10000, purged=(9, 3, 3))
    assert ds.purged == (3, 9) and ds.split_sizes() == cd.split_sizes(9998)
    assert ds.purged_tag == purged_tag([3, 9]) and ds.purged_tag.startswith("2-")
    base = {"dataset_name": "cifar10", "dataset_md5": "a" * 32, "split_seed": 0, "test_size": 3500}
    plain = champions.identity(base)
    assert plain == f"cifar10-{'a' * 32}-split0-test3500"  # as it always was
    assert champions.identity({**base, "dataset_purged": ds.purged_tag}) == f"{plain}-purged{ds.purged_tag}"
    assert DatasetRef(key="k", md5="m", sha256="s").purged_tag is None


# -- a real run, in-process, on synthetic data with near-duplicates planted in the hold-out ----

N_HOLD = 500


@pytest.fixture
def planted(tmp_path) -> tuple[Path, str, set[int]]:
    """An archive of 1,000 train and 500 hold-out images, 20 of those near-duplicates of
    train images: (path, md5, the planted hold-out indices)."""
    x, y = _images(1000 + N_HOLD, 31)
    train, hold = (x[:1000].copy(), y[:1000].copy()), (x[1000:].copy(), y[1000:].copy())
    _, dst, _ = _plant(train[0], hold[0], 20, seed=32)
    path, md5 = _write_archive(tmp_path / "planted", train, hold, list(cd.CLASSES))
    return path, md5, set(dst.tolist())


def _run_files(store: Path, run_id: str, name: str) -> list[Path]:
    return sorted((store / "runs" / run_id).rglob(name))


@pytest.mark.slow
def test_a_purged_run_drops_the_near_duplicates_everywhere(tmp_path, monkeypatch, prefect_harness, planted, tiny):
    from flows.train_cifar import train_cifar

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    path, md5, dst = planted
    store = tmp_path / "store"
    kw = dict(data_dir=str(path.parent), data_md5=md5, variants=["none", "flip"], model=tiny, epochs=1, subset=300,
              store=str(store), device="cpu")
    out = train_cifar(run_id="purged", purge_test_duplicates=True, **kw)
    m = json.loads(Path(out["manifest"]).read_text())
    purged = m["data_checks"]["purged"]
    # against the whole hold-out and all 1,000 train images, though the run trains on 300
    assert purged == sorted(purged) and len(set(purged) & dst) >= 18 and len(set(purged) - dst) <= 1
    n_val, n_test = cd.split_sizes(N_HOLD - len(purged))
    ds = m["dataset"]
    assert ds["sizes"] == {"train": 300, "val": n_val, "test": n_test}
    assert ds["purged"] == len(purged) and ds["purged_tag"] == purged_tag(purged)
    assert ds["identity"].endswith(f"-test{n_test}-purged{purged_tag(purged)}")
    assert m["params"]["purge_test_duplicates"] is True
    near = next(c for c in m["data_checks"]["checks"] if c["name"] == "near_duplicates")
    assert near["passed"] and near["purged"] == purged and near["count"] >= 1  # still reported
    assert m["fingerprint"]["parts"]["dataset"]["purged"] == purged_tag(purged)
    assert m["fingerprint"]["parts"]["dataset"]["test_size"] == n_test
    # the test split and every unit's validation split are the purged ones
    (test_preds,) = _run_files(store, "purged", "test_predictions.safetensors")
    assert len(load_file(str(test_preds))["predicted"]) == n_test
    val_preds = _run_files(store, "purged", "val_predictions.safetensors")
    assert len(val_preds) == 2 and all(len(load_file(str(f))["predicted"]) == n_val for f in val_preds)
    champion = json.loads((store / "champions" / f"{ds['identity']}.json").read_text())["champion"]
    assert champion["run_id"] == "purged" and champion["dataset_purged"] == purged_tag(purged)

    # without purge: the run it always was, and another dataset identity with a champion of its own
    out = train_cifar(run_id="plain", **kw)
    m2 = json.loads(Path(out["manifest"]).read_text())
    n_val2, n_test2 = cd.split_sizes(N_HOLD)
    assert m2["dataset"]["sizes"] == {"train": 300, "val": n_val2, "test": n_test2}
    assert "purged" not in m2["dataset"] and "purged" not in m2["data_checks"]
    assert "purged" not in m2["fingerprint"]["parts"]["dataset"]
    assert m2["dataset"]["identity"] == f"{ds['name']}-{md5}-split0-test{n_test2}"
    assert m2["dataset"]["identity"] != ds["identity"] and out["promoted"] is True and out["compared_with"] is None
    (test_preds,) = _run_files(store, "plain", "test_predictions.safetensors")
    assert len(load_file(str(test_preds))["predicted"]) == n_test2
    plain = json.loads((store / "champions" / f"{m2['dataset']['identity']}.json").read_text())["champion"]
    assert "dataset_purged" not in plain
    # the purged run's id without purge: its units selected their epochs on another validation split
    with pytest.raises(ValueError, match=r"trained with other parameters: purged hold-out '\d+-[0-9a-f]{8}' "
                                         r"\(stored\) vs None \(asked\)"):
        train_cifar(run_id="purged", force=True, **kw)
