"""Successive halving and the device-time budget: the rule on recorded scores (no training),
the budget's account under units booking at once, and whole runs in lanes where a unit is
made clearly worse (`scramble`: noise for images)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cnn.halving import MissingScores, decide, kept, rungs
from cnn.stats import paired_difference
from run.budget import Budget
from store import LocalStore


def test_rungs_are_r_times_powers_of_eta_below_the_last_epoch():
    assert rungs(1, 3, 30) == [1, 3, 9, 27]
    assert rungs(2, 2, 16) == [2, 4, 8]
    assert rungs(1, 3, 9) == [1, 3]  # the last epoch is the end, not a rung
    assert rungs(5, 3, 5) == []
    with pytest.raises(ValueError, match="halving_factor: expected at least 2, found 1"):
        rungs(1, 1, 10)
    with pytest.raises(ValueError, match="halving_min_epochs: expected at least 1, found 0"):
        rungs(0, 3, 10)


def test_the_top_ceil_n_over_eta_go_on():
    assert [kept(n, 3) for n in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]
    assert [kept(n, 2) for n in (1, 2, 3, 5)] == [1, 1, 2, 3]


def _paired(correct: dict[str, np.ndarray]):
    calls = []

    def paired(a, b):
        calls.append((a, b))
        return paired_difference(correct[a], correct[b])
    return paired, calls


def _correct(acc: float, n: int = 400, seed: int = 0) -> np.ndarray:
    """(1, n) outcomes with exactly `acc` right, shuffled by `seed`."""
    row = np.zeros(n, bool)
    row[: round(acc * n)] = True
    return np.random.default_rng(seed).permutation(row)[None]


def test_recorded_rungs_stop_exactly_the_expected_variants():
    # six variants' scores at two rungs, as a run of eta 3 would record them
    rung1 = {"none": 0.41, "flip": 0.52, "crop": 0.47, "flip-crop": 0.55, "flip-crop-cutout": 0.30,
             "flip-crop-jitter": 0.49}
    correct = {v: _correct(a, seed=i) for i, (v, a) in enumerate(rung1.items())}
    paired, calls = _paired(correct)
    go_on, stops = decide(1, 1, rung1, 3, paired)
    assert go_on == ["flip-crop", "flip"]
    assert [s.variant for s in stops] == ["flip-crop-jitter", "crop", "none", "flip-crop-cutout"]
    assert all(s.leader == "flip-crop" and s.cutoff == 0.52 and s.rung == 1 and s.epoch == 1 for s in stops)
    assert sorted(calls) == sorted((s.variant, "flip-crop") for s in stops)  # paired with the leader only
    worst = stops[-1]
    assert worst.difference == pytest.approx(0.30 - 0.55) and worst.ci[1] < 0 and worst.distinguishable
    assert "clearly behind the leader flip-crop" in worst.sentence
    close = stops[0]  # 0.49 vs 0.55 on 400 images, different images right: not clear-cut
    assert close.ci[0] < close.difference < close.ci[1]

    rung2 = {"flip-crop": 0.60, "flip": 0.63}
    go_on, stops = decide(2, 3, rung2, 3, _paired({v: _correct(a) for v, a in rung2.items()})[0])
    assert go_on == ["flip"] and [s.variant for s in stops] == ["flip-crop"] and stops[0].rung == 2


def test_no_variant_is_stopped_on_missing_data():
    paired, calls = _paired({})
    with pytest.raises(MissingScores, match="no score yet for crop"):
        decide(1, 2, {"none": 0.9, "flip": 0.1, "crop": None}, 3, paired)
    assert calls == []


def test_ties_keep_the_earlier_variant():
    scores = {"none": 0.5, "flip": 0.5, "crop": 0.5}
    go_on, stops = decide(1, 1, scores, 3, _paired({v: _correct(0.5) for v in scores})[0])
    assert go_on == ["none"] and [s.variant for s in stops] == ["flip", "crop"]
    assert "not distinguishable from the leader none" in stops[0].sentence


def test_the_budget_refuses_an_epoch_that_would_pass_it(tmp_path):
    b = Budget(LocalStore(str(tmp_path)), "r1", limit_s=10.0)
    assert b.may_start("a", 0.0, None)  # a first epoch: nothing measured, nothing reserved
    b.book("a", 4.0, 4.0)
    assert b.may_start("a", 4.0, 4.0)  # 4 used + 4 reserved
    assert not b.may_start("b", 0.0, None)  # b's first epoch, estimated by a's 4 s: 8 + 4 > 10
    assert not b.may_start("b", 0.0, 3.0)  # 8 + 3 > 10
    assert b.may_start("b", 0.0, 2.0)  # 8 + 2 = 10
    b.book("a", 8.5, 4.5)
    assert not b.may_start("a", 8.5, 4.5)
    assert b.summary() == {"limit_s": 10.0, "used_s": 8.5, "units": {"a": 8.5, "b": 0.0}}
    doc = json.loads((tmp_path / "runs" / "r1" / "budget.json").read_text())
    assert doc["units"]["b"] == {"used_s": 0.0, "reserved_s": 2.0}


def test_units_reserving_at_once_never_share_out_more_than_the_budget(tmp_path):
    store = LocalStore(str(tmp_path))
    granted = []

    def unit(i: int) -> None:
        if Budget(store, "r1", limit_s=10.0).may_start(f"u{i}", 0.0, 3.0):
            granted.append(i)

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 3  # 3 x 3 s fit in 10 s, a fourth would not
    doc = json.loads((tmp_path / "runs" / "r1" / "budget.json").read_text())
    assert sorted(doc["units"]) == sorted(f"u{i}" for i in granted)


# ---------------------------------------------------------------- whole runs, in lanes


@pytest.fixture
def halving_env(tmp_path, monkeypatch, tiny, prefect_harness):
    import cnn.augment
    from tests.extras.sitecustomize import scramble

    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cnn.augment.VARIANTS, "scramble", [scramble])
    return tmp_path


def _run(env: Path, synthetic_archive, tiny: str, run_id: str, **kw) -> dict:
    from flows.train_cifar import train_cifar

    path, md5 = synthetic_archive
    args = dict(data_dir=str(path.parent), data_md5=md5, variants=["none", "flip", "scramble"], model=tiny, epochs=4,
                patience=4, store=str(env / "store"), device="cpu", run_id=run_id)
    out = train_cifar(**{**args, **kw})
    return json.loads(Path(out["manifest"]).read_text())


def _by_name(manifest: dict) -> dict[str, dict]:
    return {v["name"]: v for v in manifest["variants"]}


@pytest.mark.slow
def test_halving_in_lanes_stops_the_scrambled_unit_and_selects_what_the_full_grid_selects(halving_env,
                                                                                           synthetic_archive, tiny):
    halved = _run(halving_env, synthetic_archive, tiny, "halved", halving="on", halving_min_epochs=2,
                  halving_factor=2)
    full = _run(halving_env, synthetic_archive, tiny, "full")

    h, f = _by_name(halved), _by_name(full)
    assert h["scramble"]["status"] == "pruned" and h["scramble"]["epochs_run"] == 2
    stop = h["scramble"]["pruned"]
    assert (stop["rung"], stop["epoch"]) == (1, 2)
    assert stop["leader"] in ("none", "flip") and stop["ci"][1] < 0  # clearly behind, and it says so
    assert "clearly behind the leader" in stop["sentence"]
    [rung] = halved["halving"]["rungs"]
    assert (rung["rung"], rung["epoch"], [s["variant"] for s in rung["stops"]]) == (1, 2, ["scramble"])
    assert sorted(rung["kept"]) == ["flip", "none"]
    assert halved["halving"]["min_epochs"] == 2 and halved["halving"]["factor"] == 2
    # the survivors resumed from their rung checkpoints and trained exactly as the full grid's
    for v in ("none", "flip"):
        assert h[v]["status"] == f[v]["status"] == "completed" and h[v]["epochs_run"] == 4
        assert h[v]["val_accuracy"] == f[v]["val_accuracy"] and h[v]["val_loss"] == f[v]["val_loss"]
    assert halved["selected"] == full["selected"] != "scramble"
    assert sum(v["epochs_run"] for v in halved["variants"]) == 10 < sum(v["epochs_run"] for v in full["variants"])
    assert "halving" not in full and "budget" not in full  # a run without them: the manifest as before
    report = (halving_env / "store" / "runs" / "halved" / "report.md").read_text()
    assert "pruned at rung 1" in report and "Rung 1 (epoch 2): " in report
    assert "](rungs.png)" in report and (halving_env / "store" / "runs" / "halved" / "rungs.png").stat().st_size > 1000
    assert "rungs.png" not in (halving_env / "store" / "runs" / "full" / "report.md").read_text()

    # the pruned unit kept its checkpoint and has no final record: the same run id with
    # halving off resumes it from epoch 2
    folder = halving_env / "store" / "runs" / "halved" / "variants" / "scramble"
    lease = json.loads((folder / "lease.json").read_text())
    assert "paused.json" in json.dumps(lease) and "metrics.json" not in json.dumps(lease)
    again = _by_name(_run(halving_env, synthetic_archive, tiny, "halved"))
    assert again["scramble"]["status"] == "completed" and again["scramble"]["epochs_run"] == 4
    assert again["none"]["val_accuracy"] == h["none"]["val_accuracy"]  # already trained: not again


@pytest.mark.slow
def test_a_budget_of_half_a_second_ends_the_run_after_its_first_epoch(halving_env, synthetic_archive, tiny):
    m = _run(halving_env, synthetic_archive, tiny, "budget", variants=["none", "flip"],
             budget_gpu_hours=0.5 / 3600)
    v = _by_name(m)
    # the run's first epoch starts with nothing measured; it passed the half second, so no
    # other epoch started: flip's first was estimated by none's
    assert (v["none"]["status"], v["none"]["epochs_run"]) == ("stopped_by_budget", 1)
    assert (v["flip"]["status"], v["flip"]["epochs_run"]) == ("stopped_by_budget", 0)
    assert m["selected"] == "none"
    b = m["budget"]
    assert b["ended_run"] is True and b["stopped"] == ["none", "flip"] and b["limit_s"] == pytest.approx(0.5)
    assert b["units"] == {"none": pytest.approx(v["none"]["seconds"], abs=1e-3)}  # flip never started one
    assert b["used_s"] == pytest.approx(v["none"]["seconds"], abs=1e-3)
    report = (halving_env / "store" / "runs" / "budget" / "report.md").read_text()
    assert "stopped by budget" in report


@pytest.mark.slow
def test_a_parent_that_crashed_after_a_rung_reads_its_decision_back(halving_env, synthetic_archive, tiny,
                                                                    monkeypatch):
    import flows.halving

    real = flows.halving.rung_decision

    def then_crash(*a, **k):
        real(*a, **k)
        raise MachineLost("the parent's machine is gone after rung 1's decision")

    monkeypatch.setattr(flows.halving, "rung_decision", then_crash)
    with pytest.raises(Exception, match="machine is gone"):
        _run(halving_env, synthetic_archive, tiny, "crash", halving="on", halving_min_epochs=2, halving_factor=2)
    decision = halving_env / "store" / "runs" / "crash" / "halving" / "rung-1.json"
    written = decision.read_bytes()
    monkeypatch.setattr(flows.halving, "rung_decision", real)
    # the retry: the scores it would decide on are the stored ones; the decision is read, not made
    calls = []
    monkeypatch.setattr(flows.halving, "decide", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("decided a second time")))
    m = _run(halving_env, synthetic_archive, tiny, "crash", halving="on", halving_min_epochs=2, halving_factor=2)
    assert decision.read_bytes() == written and calls == []
    assert m["halving"]["rungs"] == [json.loads(written)]
    v = _by_name(m)
    assert v["scramble"]["status"] == "pruned" and v["scramble"]["epochs_run"] == 2
    assert v["none"]["epochs_run"] == v["flip"]["epochs_run"] == 4


class MachineLost(Exception):
    pass


def test_a_planted_budget_record_that_is_not_seconds_is_refused_naming_it(tmp_path):
    b = Budget(LocalStore(str(tmp_path)), "r1", limit_s=10.0)
    path = tmp_path / "runs" / "r1" / "budget.json"
    path.parent.mkdir(parents=True)
    for units in ({"a": {"used_s": -50.0}}, {"a": {"used_s": "lots"}}, ["a"]):
        path.write_text(json.dumps({"limit_s": 10.0, "units": units}))
        with pytest.raises(ValueError, match=r"budget\.json: expected 'units' as \{unit: \{used_s"):
            b.may_start("b", 0.0, 1.0)
