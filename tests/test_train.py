"""The training loop: learning, early stopping, resume, divergence, re-entrancy, compile.

Runs use `tiny`, the seed network at small widths with the seed recipe, on a few
hundred synthetic images: the same loop, a fraction of the compute."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open

from cnn import augment
from cnn import train as train_module
from cnn.checkpoint import CHECKPOINT
from cnn.config import make_config, resolve_precision
from cnn.data import Splits, load_splits
from cnn.models import build_model
from cnn.train import make_optimizer, make_scheduler, train, variants_that_fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(prepared_dir) -> Splits:
    s = load_splits(prepared_dir, split_seed=0)
    return Splits(s.train_x[:640], s.train_y[:640], s.val_x[:160], s.val_y[:160], s.test_x, s.test_y, s.classes)


def no_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_loss_falls(tiny, data, tmp_path):
    cfg = make_config(tiny, "flip", epochs=4, patience=4, seed=0, batch_size=32)
    result = train(cfg, data, CPU, tmp_path)
    h = result["history"]
    assert result["status"] == "completed" and result["epochs_run"] == 4 and len(h) == 4
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert result["val_loss"] == min(r["val_loss"] for r in h)
    assert result["val_accuracy"] > 0.2  # ten classes: chance is 0.1
    assert set(result) == {"status", "epochs_run", "best_epoch", "val_loss", "val_accuracy", "seconds",
                           "history", "best_state", "best_predictions", "error"}
    # the best epoch's predicted classes, one per validation image, agree with its accuracy
    pred = result["best_predictions"]
    assert pred.dtype == torch.uint8 and pred.shape == data.val_y.shape
    assert (pred.long() == data.val_y).float().mean().item() == pytest.approx(result["val_accuracy"])


def test_paced_is_tiny_with_each_training_step_waiting(tiny, paced, data, tmp_path):
    """The fault tests' `paced` (tests/extras/): tiny's arithmetic, to the last digit, in
    epochs as long as the seed network's, so that a test can kill a run mid-epoch."""
    from tests.extras.sitecustomize import PACE_S_PER_IMAGE

    runs = {m: train(make_config(m, "none", epochs=1, patience=1, seed=0, batch_size=64), data, CPU, tmp_path / m)
            for m in (tiny, paced)}
    assert no_seconds(runs[paced]["history"]) == no_seconds(runs[tiny]["history"])
    assert runs[paced]["history"][0]["seconds"] >= len(data.train_y) * PACE_S_PER_IMAGE  # 5 s


def test_early_stopping_stops(tiny, data, tmp_path, monkeypatch):
    # the real evaluation, with its loss replaced by a script: best at epoch 2, then worse
    script = iter([1.0, 0.9, 0.95, 0.91, 0.5, 0.4])
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **kw: {**real(*a, **kw), "loss": next(script)})
    cfg = make_config(tiny, "none", epochs=6, patience=2, seed=0, batch_size=64)
    result = train(cfg, data, CPU, tmp_path)
    assert result["status"] == "early_stopped"
    assert result["epochs_run"] == 4 and result["best_epoch"] == 2 and result["val_loss"] == 0.9
    assert [r["val_loss"] for r in result["history"]] == [1.0, 0.9, 0.95, 0.91]


def test_resume_continues_with_the_same_history(tiny, data, tmp_path):
    cfg = make_config(tiny, "flip-crop-cutout", epochs=4, patience=4, seed=5, batch_size=64)
    whole = train(cfg, data, CPU, tmp_path / "whole")

    def crash_after_2(row, ckpt):
        if row["epoch"] == 2:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        train(cfg, data, CPU, tmp_path / "cut", on_epoch=crash_after_2)
    seen = []
    resumed = train(cfg, data, CPU, tmp_path / "cut", on_epoch=lambda row, ckpt: seen.append(row["epoch"]))
    assert seen == [3, 4]  # resumed at k + 1
    assert no_seconds(resumed["history"]) == no_seconds(whole["history"])
    assert resumed["status"] == whole["status"] == "completed"
    for k, v in whole["best_state"].items():
        assert torch.equal(resumed["best_state"][k], v), k
    assert torch.equal(resumed["best_predictions"], whole["best_predictions"])  # kept in the checkpoint
    # a finished variant is not trained again
    again = train(cfg, data, CPU, tmp_path / "cut", on_epoch=lambda row, ckpt: seen.append(-1))
    assert -1 not in seen and no_seconds(again["history"]) == no_seconds(whole["history"])


def test_checkpoint_of_another_config_is_refused(tiny, data, tmp_path):
    train(make_config(tiny, "none", epochs=1, patience=1, seed=0, batch_size=64), data, CPU, tmp_path)
    with pytest.raises(ValueError, match="different config"):
        train(make_config(tiny, "none", epochs=1, patience=1, seed=1, batch_size=64), data, CPU, tmp_path)


def test_non_finite_loss_gives_diverged(tiny, data, tmp_path, monkeypatch):
    monkeypatch.setitem(augment.VARIANTS, "poison", [lambda x, g: x * float("nan")])
    cfg = make_config(tiny, "poison", epochs=3, patience=3, seed=0, batch_size=64)
    result = train(cfg, data, CPU, tmp_path)
    assert result["status"] == "diverged" and result["epochs_run"] == 1
    assert "non-finite" in result["error"] and result["best_state"] is None and result["history"] == []
    again = train(cfg, data, CPU, tmp_path)  # the checkpoint records it: not retried
    assert again["status"] == "diverged"


def test_concurrent_variants_match_alone(tiny, data, tmp_path):
    """Two variants trained at once in two threads give exactly what each gives alone."""
    cfgs = [make_config(tiny, v, epochs=2, patience=2, seed=11, batch_size=64) for v in ("flip-crop", "flip-crop-jitter")]
    alone = [train(c, data, CPU, tmp_path / "alone" / c.variant) for c in cfgs]
    together: dict[str, dict] = {}
    barrier = threading.Barrier(2)

    def run(c):
        barrier.wait()  # start together: model initialisation and the first steps overlap
        together[c.variant] = train(c, data, CPU, tmp_path / "together" / c.variant)

    threads = [threading.Thread(target=run, args=(c,)) for c in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert no_seconds(alone[0]["history"]) != no_seconds(alone[1]["history"])  # the comparison can fail
    for c, a in zip(cfgs, alone):
        assert no_seconds(together[c.variant]["history"]) == no_seconds(a["history"]), c.variant


def test_training_leaves_the_global_rng_alone(tiny, data, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(make_config(tiny, "flip", epochs=1, patience=1, seed=0, batch_size=64), data, CPU, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_seed_optimizer_decays_weights_only():
    model = build_model("seed")
    opt = make_optimizer(model, make_config("seed", "none", epochs=1, patience=1, seed=0))
    for g in opt.param_groups:
        assert g["lr"] == 0.05 and g["nesterov"]
        assert g["weight_decay"] == (5e-4 if all(p.ndim > 1 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_warmup_linear_schedule():
    cfg = make_config("fast", "none", epochs=10, patience=1, seed=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10)  # 100 steps, peak after 23
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"] / cfg.lr)
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))  # the peak is reached at the end of warm-up and held for one step
    assert peak == 22 and lrs[22] == lrs[23] == pytest.approx(1.0)
    assert lrs[0] == pytest.approx(0.2 + 0.8 / 23)
    assert lrs[-1] == pytest.approx(0.07 + 0.93 * 1 / 77)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak + 1 : -1], lrs[peak + 2 :]))


@pytest.mark.slow
def test_compile_is_warmed_once_and_matches_eager(tiny, data, tmp_path):
    import torch._dynamo.utils as dynamo_utils

    eager = train(make_config(tiny, "flip", epochs=2, patience=2, seed=0, batch_size=64), data, CPU,
                  tmp_path / "eager")
    first = train(make_config(tiny, "flip", epochs=2, patience=2, seed=0, batch_size=64, compile=True), data, CPU,
                  tmp_path / "compiled")
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    second = train(make_config(tiny, "crop", epochs=2, patience=2, seed=0, batch_size=64, compile=True), data, CPU,
                   tmp_path / "compiled-2")
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # no recompile per epoch or variant
    assert first["status"] == second["status"] == "completed"
    print("eager", no_seconds(eager["history"]), "compiled", no_seconds(first["history"]))
    for a, b in zip(first["history"], eager["history"]):  # same computation, fused differently
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.1)


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision: expected auto, fp32 or bf16, found 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, found 'auto'"):
        make_config("seed", "none", epochs=1, patience=1, seed=0, precision="auto")


def test_bf16_on_the_cpu_learns_in_autocast_and_keeps_fp32_weights(tiny, data, tmp_path):
    fp32 = train(make_config(tiny, "flip", epochs=3, patience=3, seed=0, batch_size=32), data, CPU, tmp_path / "fp32")
    bf16 = train(make_config(tiny, "flip", epochs=3, patience=3, seed=0, batch_size=32, precision="bf16"), data, CPU,
                 tmp_path / "bf16")
    h = bf16["history"]
    assert bf16["status"] == "completed" and h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert bf16["val_accuracy"] > 0.2
    # autocast was on: same seed, same batches, other rounding, so other losses
    assert [r["train_loss"] for r in h] != [r["train_loss"] for r in fp32["history"]]
    assert {v.dtype for v in bf16["best_state"].values() if v.is_floating_point()} == {torch.float32}
    with safe_open(str(tmp_path / "bf16" / CHECKPOINT), framework="pt") as f:
        assert json.loads(f.metadata()["document"])["config"]["precision"] == "bf16"
    # a checkpoint resumes only under the precision it was trained with
    with pytest.raises(ValueError, match="different config"):
        train(make_config(tiny, "flip", epochs=3, patience=3, seed=0, batch_size=32), data, CPU, tmp_path / "bf16")


def test_variants_that_fit_on_cpu_is_what_was_asked(tiny):
    cfg = make_config(tiny, "none", epochs=1, patience=1, seed=0)
    assert variants_that_fit(cfg, CPU, 50_000, 6) == 6
    with pytest.raises(ValueError, match="at least 1"):
        variants_that_fit(cfg, CPU, 50_000, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_variants_that_fit_on_cuda_is_bounded(tiny):
    cfg = make_config(tiny, "none", epochs=1, patience=1, seed=0)
    assert 1 <= variants_that_fit(cfg, torch.device("cuda"), 50_000, 4) <= 4
