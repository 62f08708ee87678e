"""Repeats, variant intervals, the runner-up comparison and a promotion that is not a coin toss.

Selection, naming and decisions on fabricated results and predictions; one run of the
flow under Prefect's test harness (2 variants x 2 repeats, then a rerun and a second
run on the same store) on a small synthetic set.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnn.stats import promotion
from store import LocalStore
from run.layout import Unit, stored_key, units_of
from run.records import UnitResult
from tasks.scoring import combine
from tests.judges import promote_by_accuracy


def _repeat(name: str, seed: int, acc: float, loss: float = 1.0, status: str = "completed") -> UnitResult:
    return UnitResult(name=name, status=status, epochs_run=2, best_epoch=2, val_loss=loss, val_accuracy=acc,
                         seconds=1.0, seed=seed, weights_key=f"runs/r/variants/{name}/seed-{seed}/best.safetensors")


def _correct(accs: list[float], n: int = 1000) -> np.ndarray:
    """(R, n) bool: repeat r right on the first accs[r] * n images."""
    return np.stack([np.arange(n) < round(a * n) for a in accs])


def test_selection_goes_by_the_mean_and_tests_the_best_repeat():
    from tasks.selection import select_variant

    # "lucky" has the best single repeat (0.90) but the lower mean (0.75); "steady" wins
    lucky = [_repeat("lucky", 0, 0.90), _repeat("lucky", 1, 0.60)]
    steady = [_repeat("steady", 0, 0.80), _repeat("steady", 1, 0.82)]
    results = [combine("lucky", lucky, _correct([0.90, 0.60]), "val_accuracy"),
               combine("steady", steady, _correct([0.80, 0.82]), "val_accuracy")]
    assert results[0].val_accuracy_mean == pytest.approx(0.75) and results[1].val_accuracy_mean == pytest.approx(0.81)
    chosen = select_variant.fn(results, "val_accuracy")
    assert chosen.name == "steady"
    assert chosen.seed == 1 and chosen.val_accuracy == 0.82  # its best repeat's model goes to the test
    assert chosen.weights_key.endswith("steady/seed-1/best.safetensors")
    low, high = chosen.val_accuracy_ci
    assert low < 0.81 < high
    assert [r["seed"] for r in chosen.repeats] == [0, 1]
    assert set(chosen.repeats[0]) == {"seed", "status", "best_epoch", "val_loss", "val_accuracy", "seconds"}


def test_equal_means_go_to_the_lower_mean_loss_and_a_diverged_repeat_is_left_out():
    a = combine("a", [_repeat("a", 0, 0.8, loss=0.5), _repeat("a", 1, 0.8, loss=0.7)], _correct([0.8, 0.8]),
                "val_accuracy")
    b = combine("b", [_repeat("b", 0, 0.8, loss=0.55), _repeat("b", 1, 0.8, loss=0.6)], _correct([0.8, 0.8]),
                "val_accuracy")
    from tasks.selection import select_variant

    assert select_variant.fn([a, b], "val_accuracy").name == "b"  # mean loss 0.575 against 0.6
    c = combine("c", [_repeat("c", 0, 0.7), _repeat("c", 1, 0.0, status="diverged")], _correct([0.7]),
                "val_accuracy")
    assert c.val_accuracy_mean == pytest.approx(0.7) and [r["status"] for r in c.repeats] == ["completed", "diverged"]
    dead = combine("d", [_repeat("d", 0, 0.0, status="diverged"), _repeat("d", 1, 0.0, status="failed")], None,
                   "val_accuracy")
    assert not dead.selectable and dead.val_accuracy_ci is None and "seed 1: failed" in dead.error


def test_a_units_metrics_json_holds_its_own_fields_and_an_older_one_is_still_read():
    unit = _repeat("a", 0, 0.8)
    written = json.loads(unit.to_json())
    assert not {"repeats", "val_accuracy_mean", "val_loss_mean", "val_accuracy_ci"} & set(written)
    older = {**written, "repeats": None, "val_accuracy_mean": None, "val_loss_mean": None, "val_accuracy_ci": None}
    assert UnitResult.from_dict(older) == unit


def test_units_and_child_names_keep_todays_with_one_repeat():
    from flows.fanout import child_name, idempotency_key

    assert units_of(["none", "flip"], 0, 1) == [Unit("none", 0), Unit("flip", 0)]
    one = Unit("flip", 0)
    assert child_name("run", one, 1) == "run-flip-a1" and idempotency_key("run", one, 1) == "run:flip:1"
    assert one.key("run", "metrics.json") == "runs/run/variants/flip/metrics.json"
    units = units_of(["none", "flip"], 5, 2)
    assert [(u.variant, u.seed) for u in units] == [("none", 5), ("none", 6), ("flip", 5), ("flip", 6)]
    two = units[3]
    assert child_name("run", two, 2) == "run-flip-s6-a2" and idempotency_key("run", two, 2) == "run:flip:s6:2"
    assert two.key("run", "checkpoint.safetensors") == "runs/run/variants/flip/seed-6/checkpoint.safetensors"
    assert len({child_name("run", u, 1) for u in units}) == 4  # every repeat its own child


def test_child_parameters_carry_the_repeats_seed():
    from run.context import RunContext
    from run.params import RunParams
    from run.records import DatasetRef
    from flows.variants import child_parameters

    p = RunParams(variants=["flip"], repeats=3, seed=10, store="/abs/store")
    ds = DatasetRef(key="datasets/cifar10/x", md5="x", sha256="y")
    got = [child_parameters(RunContext(p, "run", dataset=ds), u) for u in units_of(p.variants, p.seed, p.repeats)]
    assert [(c["seed"], c["repeats"]) for c in got] == [(10, 3), (11, 3), (12, 3)]
    single = child_parameters(RunContext(RunParams(variants=["flip"], store="/abs/store"), "run", dataset=ds),
                              Unit("flip", 0))
    assert "repeats" not in single and single["seed"] == 0  # a run of one repeat starts children as before


def test_a_handful_of_images_is_not_enough_to_promote_unless_confidence_is_zero():
    champion = np.arange(3500) < 3000  # right on 3000 of 3500 test images
    new = champion.copy()
    new[3000:3004] = True  # and the new model gets 4 more right: +0.11 points
    assert not promotion(new, champion, confidence=0.95, margin=0.0, champion_run="old").promoted
    assert promotion(new, champion, confidence=0, margin=0.0, champion_run="old").promoted
    clearly = champion.copy()
    clearly[3000:3200] = True  # 200 more right, none worse: +5.7 points
    d = promotion(clearly, champion, confidence=0.95, margin=0.0, champion_run="old")
    assert d.promoted and d.ci[0] > 0.04 and "champion old" in d.reason


def _rec(run: str, acc: float) -> dict:
    """A champion record of one dataset identity."""
    return {"run_id": run, "test": {"accuracy": acc}, "dataset_name": "cifar10", "dataset_md5": "a" * 32,
            "split_seed": 0, "test_size": 3500}


def test_publish_decides_on_the_paired_comparison_and_faces_a_champion_that_changed(tmp_path, monkeypatch):
    """promote() decides again, with the judge, against whatever champion it finds: the test's
    comparison for the champion the test faced, a fresh one for a champion that won meanwhile."""
    from store import open_store
    from registry import champions

    st = open_store(str(tmp_path / "store"))
    champions.promote(st, _rec("old", 0.80), promote_by_accuracy(0.0))
    faced = []

    def judge(current, candidate):
        faced.append(current["run_id"])
        d = promotion(np.arange(3500) < 3004, np.arange(3500) < 3000, 0.95, 0.0, champion_run=current["run_id"])
        return d.promoted, d.reason

    d = champions.promote(st, _rec("new", 0.86), judge)  # higher accuracy, but only 4 images decide
    assert not d.promoted and faced == ["old"] and "not enough to promote" in d.reason and d.compared_with == "old"
    assert champions.read(st, champions.identity(_rec("x", 0)))["run_id"] == "old"


def test_a_champion_that_won_after_the_test_is_faced_once(tmp_path):
    """publish's judge: the champion the test faced is answered from the test; one that
    won meanwhile is evaluated once, though decide() and promote() both ask."""
    from store import open_store
    from registry import champions
    from run.records import ChampionComparison
    from tasks.publish import ChampionJudge

    st = open_store(str(tmp_path / "store"))
    champions.promote(st, _rec("meanwhile", 0.80), promote_by_accuracy(0.0))
    evaluated = []

    def face_again(current):
        evaluated.append(current["run_id"])
        return ChampionComparison(champion_run_id=current["run_id"], promoted=True, reason="beats it", difference=0.05)

    tested = ChampionComparison(champion_run_id="old", promoted=False, reason="the test's", difference=0.0)
    judge = ChampionJudge(tested, face_again)
    assert judge(_rec("old", 0.8), _rec("new", 0.9)) == (False, "the test's") and evaluated == []
    current = champions.read(st, champions.identity(_rec("x", 0)))
    assert champions.decide(current, _rec("new", 0.9), judge) == (True, "beats it")
    d = champions.promote(st, _rec("new", 0.9), judge)
    assert d.promoted and d.compared_with == "meanwhile" and evaluated == ["meanwhile"]
    assert judge.final.champion_run_id == "meanwhile"


# ------------------------------------------------------------------------------------------
@pytest.fixture
def run_env(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.slow
def test_two_variants_two_repeats_resume_per_repeat_and_face_the_champion(run_env, synthetic_archive, monkeypatch):
    import tasks.training
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    store = run_env / "store"
    kw = dict(data_dir=str(path.parent), data_md5=md5, epochs=2, subset=300, store=str(store), device="cpu")
    trained = []  # (variant, seed, resumed from a checkpoint?) of every train() call
    real_train = tasks.training.train

    def spy(cfg, data, device, workdir, **k):
        trained.append((cfg.variant, cfg.seed, (Path(workdir) / "checkpoint.safetensors").exists()))
        return real_train(cfg, data, device, workdir, **k)

    monkeypatch.setattr(tasks.training, "train", spy)
    out = train_cifar(run_id="rep", variants=["none", "flip"], repeats=2, seed=3, **kw)
    run = store / "runs" / "rep"
    m = json.loads((run / "manifest.json").read_text())
    assert sorted(trained) == [("flip", 3, False), ("flip", 4, False), ("none", 3, False), ("none", 4, False)]
    for v in ("none", "flip"):
        for s in (3, 4):
            for f in ("checkpoint.safetensors", "history.csv", "metrics.json", "best.safetensors",
                      "val_predictions.safetensors"):
                key = stored_key(LocalStore(store), "rep", Unit(v, s, True), f)  # where the unit's lease names it
                assert key.startswith(f"runs/rep/variants/{v}/seed-{s}/") and (store / key).is_file(), (v, s, f)
        assert not (run / "variants" / v / "checkpoint.safetensors").exists()

    # the manifest's contract
    assert m["params"]["repeats"] == 2 and m["params"]["promote_confidence"] == 0.95
    for v in m["variants"]:
        assert [r["seed"] for r in v["repeats"]] == [3, 4]
        assert all(set(r) == {"seed", "status", "best_epoch", "val_loss", "val_accuracy", "seconds"} for r in v["repeats"])
        assert isinstance(v["val_accuracy_mean"], float)
        low, high = v["val_accuracy_ci"]
        assert 0 <= low <= v["val_accuracy_mean"] <= high <= 1
        assert v["val_accuracy_mean"] == pytest.approx(np.mean([r["val_accuracy"] for r in v["repeats"]]), abs=1e-6)
        assert v["val_accuracy"] == max(r["val_accuracy"] for r in v["repeats"])  # the best repeat's
        assert v["attempts"] == 1 and v["status"] in ("completed", "early_stopped")
    means = {v["name"]: v["val_accuracy_mean"] for v in m["variants"]}
    assert m["selected"] == max(means, key=means.get)
    c = m["comparison"]
    assert set(c) >= {"selected", "runner_up", "difference", "ci", "distinguishable", "method"}
    assert (c["selected"], c["runner_up"]) == (m["selected"], ({"none", "flip"} - {m["selected"]}).pop())
    assert c["ci"][0] <= c["difference"] <= c["ci"][1] and isinstance(c["distinguishable"], bool)
    assert c["difference"] == pytest.approx(means[c["selected"]] - means[c["runner_up"]], abs=1e-6)
    assert "champion_comparison" not in m["test"] and out["promoted"] is True  # the first champion
    report = (run / "report.md").read_text()
    assert c["sentence"] in report and "val_accuracy_mean" in report

    # an interrupted repeat (its checkpoint stored, its metrics.json not): only it trains again,
    # from its checkpoint; the others are read back
    (store / stored_key(LocalStore(store), "rep", Unit("flip", 4, True), "metrics.json")).unlink()
    trained.clear()
    train_cifar(run_id="rep", variants=["none", "flip"], repeats=2, seed=3, **kw)
    assert trained == [("flip", 4, True)]
    again = json.loads((run / "manifest.json").read_text())
    assert [v["val_accuracy_mean"] for v in again["variants"]] == [v["val_accuracy_mean"] for v in m["variants"]]

    # a second run of one repeat on the same store: today's layout, and the champion's model
    # tested beside it on the same images
    second = train_cifar(run_id="one", variants=["none"], **kw)
    one = store / "runs" / "one"
    m1 = json.loads((one / "manifest.json").read_text())
    for f in ("checkpoint.safetensors", "val_predictions.safetensors"):
        key = stored_key(LocalStore(store), "one", Unit("none", 0), f)
        assert key.startswith("runs/one/variants/none/gen-") and (store / key).is_file(), f
    assert not (one / "variants/none/seed-0").exists()
    assert m1["comparison"] is None  # one variant: nothing to compare it with
    faced = m1["test"]["champion_comparison"]
    assert faced["champion_run_id"] == "rep" and second["compared_with"] == "rep"
    assert isinstance(faced["difference"], float) and len(faced["ci"]) == 2 and faced["method"]
    assert m1["promoted"] == (faced["ci"][0] > 0) and "champion rep" in m1["promotion_reason"]
    assert m1["variants"][0]["repeats"][0]["seed"] == 0 and len(m1["variants"][0]["repeats"]) == 1


def test_a_bad_predictions_file_is_refused_naming_it():
    from safetensors.numpy import save

    from tasks.scoring import right

    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    where = "s3://b/p/runs/r/model/test_predictions.safetensors"
    good = save({"predicted": np.array([0, 1, 0, 3], dtype=np.uint8)})
    assert right(good, where, labels).tolist() == [True, True, False, True]
    for raw, found in [(b"not a safetensors file", "unreadable"),
                       (save({"other": np.zeros(4, dtype=np.uint8)}), "no tensor 'predicted'"),
                       (save({"predicted": np.zeros(3, dtype=np.uint8)}), "uint8 (3,)"),
                       (save({"predicted": np.zeros(4, dtype=np.int64)}), "int64 (4,)")]:
        with pytest.raises(ValueError, match="expected") as err:
            right(raw, where, labels)
        assert str(err.value).startswith(where) and found in str(err.value), err.value
