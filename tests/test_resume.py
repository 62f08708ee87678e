"""Restarting a unit: from its newest checkpoint, wherever it is; never with other parameters.

With a real local store, a prepared synthetic dataset and the tiny network."""
from __future__ import annotations

import re

import pytest

from store import LocalStore, StoreUnavailable, open_store
from run.cache import local_run_dir
from run.layout import Unit, stored_key
from tests.contexts import run_context


class MachineLost(Exception):
    pass


def _dies_after(epoch: int, real_train):
    """`train` that stops the process's work after `epoch` (its checkpoint saved and handed on)."""
    def train(cfg, data, device, workdir, on_epoch, **kw):
        def then_die(row, ckpt):
            on_epoch(row, ckpt)
            if row["epoch"] == epoch:
                raise MachineLost(f"after epoch {epoch}")

        return real_train(cfg, data, device, workdir, on_epoch=then_die, **kw)

    return train


@pytest.fixture
def run(tmp_path, monkeypatch, tiny, prefect_harness):
    """(store uri, dataset, a config maker) on a fresh local store and cache."""
    from cnn.config import make_config
    from tasks.data import fetch_dataset

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    uri = str(tmp_path / "store")
    ds = fetch_dataset.fn(run_context(uri, dataset="synthetic", synthetic_train=400, synthetic_test=200))
    return uri, ds, lambda **kw: make_config(tiny, "flip", **{"epochs": 4, "patience": 9, "seed": 0, **kw})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Artifact creation outside")  # the task's logic, run without a flow
def test_a_restart_resumes_from_the_local_checkpoint_when_the_store_is_behind(run, monkeypatch, capsys):
    import tasks.training
    from cnn.checkpoint import read_progress
    from tasks.training import train_in_lane

    uri, ds, config = run
    cfg, real_train = config(), tasks.training.train
    monkeypatch.setattr(tasks.training, "train", _dies_after(1, real_train))
    with pytest.raises(MachineLost):
        train_in_lane.fn(run_context(uri, "r1", ds, subset=300, split_seed=0, store_outage_minutes=5), cfg, "cpu")
    store, unit = open_store(uri), Unit("flip", 0)
    assert read_progress(store.root / stored_key(store, "r1", unit, "checkpoint.safetensors"))[1] == 1

    # the store goes away; training goes on here to epoch 3, then this process dies too
    real_put = LocalStore.put_file

    def down(self, key, path):
        raise StoreUnavailable(f"{self.uri}: not answering")

    monkeypatch.setattr(LocalStore, "put_file", down)
    monkeypatch.setattr(tasks.training, "train", _dies_after(3, real_train))
    with pytest.raises(MachineLost):
        train_in_lane.fn(run_context(uri, "r1", ds, subset=300, split_seed=0, store_outage_minutes=5), cfg, "cpu")
    local = local_run_dir("r1") / "variants" / "flip" / "checkpoint.safetensors"
    assert read_progress(local)[1] == 3
    assert read_progress(store.root / stored_key(store, "r1", unit, "checkpoint.safetensors"))[1] == 1

    # the same run restarted on this machine, the store back: epoch 4 follows epoch 3
    monkeypatch.setattr(LocalStore, "put_file", real_put)
    monkeypatch.setattr(tasks.training, "train", real_train)
    capsys.readouterr()
    result = train_in_lane.fn(run_context(uri, "r1", ds, subset=300, split_seed=0, store_outage_minutes=5), cfg, "cpu")
    out = capsys.readouterr().out
    assert f"flip: resuming from {local} (epoch 3); the store is at epoch 1" in out
    assert re.findall(r"flip epoch (\d)/4", out) == ["4"]  # only epoch 4 trained
    assert result.epochs_run == 4
    history = (store.root / stored_key(store, "r1", unit, "history.csv")).read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Artifact creation outside")
def test_a_foreign_local_checkpoint_is_ignored_naming_it(run, monkeypatch, capsys):
    import tasks.training
    from tasks.training import train_in_lane

    uri, ds, config = run
    real_train = tasks.training.train
    # run r2's unit dies after epoch 1 with a config other than the one asked for below
    monkeypatch.setattr(tasks.training, "train", _dies_after(1, real_train))
    with pytest.raises(MachineLost):
        train_in_lane.fn(run_context(uri, "r2", ds, subset=300, split_seed=0, store_outage_minutes=5), config(lr=0.5), "cpu")
    local = local_run_dir("r2") / "variants" / "flip" / "checkpoint.safetensors"
    (open_store(uri).root / "runs" / "r2").rename(open_store(uri).root / "elsewhere")  # the store forgets r2
    monkeypatch.setattr(tasks.training, "train", real_train)
    capsys.readouterr()
    result = train_in_lane.fn(run_context(uri, "r2", ds, subset=300, split_seed=0, store_outage_minutes=5), config(epochs=1), "cpu")
    out = capsys.readouterr().out
    assert f"warning: ignoring {local}: written with another config" in out
    assert result.epochs_run == 1 and re.findall(r"flip epoch (\d)/1", out) == ["1"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Artifact creation outside")
def test_a_reused_run_id_with_other_parameters_is_refused_before_training(run, capsys):
    from tasks.training import train_in_lane
    from run.records import UnitResult

    uri, ds, config = run
    first = train_in_lane.fn(run_context(uri, "r3", ds, subset=300, split_seed=0, store_outage_minutes=5), config(epochs=1), "cpu")
    store, unit = open_store(uri), Unit("flip", 0)
    stored = store.read_versioned(stored_key(store, "r3", unit, "metrics.json"))[0]
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"^run r3: unit flip in the store .* was trained with other parameters: "
                                         r"lr 0\.\d+ \(stored\) vs 0\.3 \(asked\)"):
        train_in_lane.fn(run_context(uri, "r3", ds, subset=300, split_seed=0, store_outage_minutes=5), config(epochs=1, lr=0.3), "cpu")
    with pytest.raises(ValueError, match=r"run r3: unit flip .*split_seed 0 \(stored\) vs 7 \(asked\)"):
        train_in_lane.fn(run_context(uri, "r3", ds, subset=300, split_seed=7, store_outage_minutes=5), config(epochs=1), "cpu")
    assert "epoch" not in capsys.readouterr().out  # nothing trained
    assert store.read_versioned(stored_key(store, "r3", unit, "metrics.json"))[0] == stored
    # the same parameters: its stored result, as before
    assert train_in_lane.fn(run_context(uri, "r3", ds, subset=300, split_seed=0, store_outage_minutes=5), config(epochs=1), "cpu") == UnitResult.read(store, "r3", unit)
    assert first.epochs_run == 1
