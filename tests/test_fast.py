"""The `fast` model (airbench94 recipe): structure, data-dependent whitening, lookahead,
test-time augmentation, and short CPU runs through the training loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from cnn import fast as fastmod
from cnn.augment import normalize
from cnn.checkpoint import CHECKPOINT
from cnn.config import make_config
from cnn.data import Splits, load_splits
from cnn.evaluate import evaluate, predict_logits
from cnn.fast import Block, FastNet, Lookahead, Norm
from cnn.models import FAST_RECIPE, MODELS, RECIPES, build_model
from cnn.train import make_optimizer, train


@pytest.fixture(scope="module")
def splits(prepared_dir) -> Splits:
    return load_splits(prepared_dir, split_seed=0)


def small(splits: Splits, n_train: int, n_val: int) -> Splits:
    s = splits
    return Splits(s.train_x[:n_train], s.train_y[:n_train], s.val_x[:n_val], s.val_y[:n_val],
                  s.test_x, s.test_y, s.classes)


@pytest.fixture
def fast_small(monkeypatch):
    """The fast network at a quarter of its widths, with the fast recipe: the same code, less compute."""
    monkeypatch.setitem(MODELS, "fast-small", lambda num_classes=10: FastNet(num_classes, widths=(16, 32, 32)))
    monkeypatch.setitem(RECIPES, "fast-small", FAST_RECIPE)
    return "fast-small"


def test_structure_and_output_shape():
    model = build_model("fast")
    assert isinstance(model.whiten, nn.Conv2d) and model.whiten.kernel_size == (2, 2)
    assert (model.whiten.in_channels, model.whiten.out_channels) == (3, 24)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert [b.conv1.out_channels for b in blocks] == [64, 256, 256]
    convs = [m for m in model.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)
    assert all(isinstance(m.act, nn.GELU) for m in blocks)
    assert model.head.bias is None
    model.eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert build_model("fast", num_classes=4).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_convs_start_as_identity():
    conv = fastmod.Conv(4, 6)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(x)[:, :4], x, atol=1e-6)


def test_whitening_is_initialised_from_data_and_frozen(splits):
    model = build_model("fast")
    x = normalize(splits.train_x[:1000])
    before = model.whiten.weight.clone()
    model.init_from_data(x)
    w = model.whiten.weight
    assert not torch.equal(w, before)
    assert torch.equal(w[12:], -w[:12])  # each direction and its negative
    # the first 12 filters decorrelate the data's 2x2 patches: their outputs'
    # covariance is diagonal, with variance lambda / (lambda + eps) <= 1
    out = F.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    off = cov - torch.diag(cov.diag())
    assert off.abs().max() < 1e-3
    assert (cov.diag() <= 1 + 1e-4).all() and cov.diag().max() > 0.99
    with pytest.raises(ValueError, match="init_from_data"):
        model.init_from_data(splits.train_x[:10])  # uint8, not normalised
    # frozen: not among the trained parameters, so no optimizer touches it
    opt = make_optimizer(model, make_config("fast", "none", epochs=1, patience=1, seed=0))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.whiten.weight) not in trained and id(model.whiten.bias) in trained


def test_optimizer_trains_batchnorm_biases_faster():
    model = build_model("fast")
    cfg = make_config("fast", "none", epochs=1, patience=1, seed=0)
    opt = make_optimizer(model, cfg)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, Norm)}
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} == norm_biases]
    assert group["lr"] == pytest.approx(64 * cfg.lr)
    assert group["lr"] * group["weight_decay"] == pytest.approx(cfg.lr * cfg.weight_decay)  # same decay per step
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.85


def test_lookahead_averages_after_its_start():
    model = nn.Linear(2, 1, bias=False)
    la = Lookahead(model, total_steps=100)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.step(25)  # before 30% of training: nothing
    assert la.average is None
    la.step(30)  # first update: the average starts at the current weights
    assert torch.equal(la.average["weight"], model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.step(32)  # not a multiple of 5: nothing
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    la.step(35)
    decay = 0.95**5 * 0.35**3
    expected = 1.0 * decay + 3.0 * (1 - decay)
    assert torch.allclose(model.weight, torch.full((1, 2), expected))  # copied back into the model
    assert torch.equal(la.average["weight"], model.weight)


def test_tta_off_equals_the_plain_evaluation(splits):
    model = FastNet(widths=(16, 32, 32)).eval()
    model.init_from_data(normalize(splits.train_x[:500]))
    x, y = splits.val_x[:40], splits.val_y[:40]
    with torch.no_grad():
        plain = model(normalize(x))
    cpu = torch.device("cpu")
    assert torch.allclose(predict_logits(model, x, cpu, batch_size=16, tta=0), plain, atol=1e-5)
    assert torch.allclose(predict_logits(model, x, cpu, batch_size=16, tta=False, pad_last=True), plain, atol=1e-5)
    m = evaluate(model, x, y, cpu, batch_size=16, tta=0)
    assert m["accuracy"] == pytest.approx((plain.argmax(1) == y).float().mean().item())
    assert m["loss"] == pytest.approx(F.cross_entropy(plain, y).item(), rel=1e-5)


def test_tta_levels_match_their_definitions(splits):
    model = FastNet(widths=(16, 32, 32)).eval()
    model.init_from_data(normalize(splits.train_x[:500]))
    x = splits.val_x[:12]
    xn = normalize(x)
    padded = F.pad(xn, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():
        def mirror(v):
            return 0.5 * (model(v) + model(v.flip(-1)))
        level1 = mirror(xn)
        level2 = 0.5 * level1 + 0.25 * (mirror(padded[..., 0:32, 0:32]) + mirror(padded[..., 2:34, 2:34]))
    cpu = torch.device("cpu")
    assert torch.allclose(predict_logits(model, x, cpu, tta=1), level1, atol=1e-5)
    assert torch.allclose(predict_logits(model, x, cpu, tta=True), level1, atol=1e-5)
    assert torch.allclose(predict_logits(model, x, cpu, batch_size=5, tta=2, pad_last=True), level2, atol=1e-5)
    with pytest.raises(ValueError, match="tta must be"):
        predict_logits(model, x, cpu, tta=3)


@pytest.mark.slow
def test_fast_trains_through_the_loop(splits, tmp_path):
    data = small(splits, 400, 100)
    cfg = make_config("fast", "flip-crop", epochs=2, patience=2, seed=0, batch_size=100)
    result = train(cfg, data, torch.device("cpu"), tmp_path)
    assert result["status"] == "completed" and result["epochs_run"] == 2
    assert len(result["history"]) == 2 and result["best_state"] is not None
    h = result["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"]
    assert result["val_accuracy"] > 0.2  # ten classes: chance is 0.1
    assert not torch.equal(result["best_state"]["whiten.weight"], build_model("fast").whiten.weight)


@pytest.mark.slow
def test_fast_resumes_with_lookahead_and_whitening_once(splits, tmp_path, fast_small, monkeypatch):
    """Interrupted after epoch 2 and restarted: the same history as an uninterrupted run,
    the whitening layer set from data once, and the lookahead average carried over."""
    calls = []
    original = FastNet.init_from_data
    monkeypatch.setattr(FastNet, "init_from_data", lambda self, x: (calls.append(len(x)), original(self, x)))
    data = small(splits, 300, 60)
    cfg = make_config(fast_small, "flip-crop", epochs=4, patience=4, seed=3, batch_size=50)
    cpu = torch.device("cpu")
    whole = train(cfg, data, cpu, tmp_path / "whole")
    assert calls == [300]

    def stop_after_2(row, ckpt):
        if row["epoch"] == 2:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, cpu, tmp_path / "cut", on_epoch=stop_after_2)
    with safe_open(str(tmp_path / "cut" / CHECKPOINT), framework="pt") as f:
        assert any(name.startswith("lookahead/") for name in f.keys())
    seen = []
    resumed = train(cfg, data, cpu, tmp_path / "cut", on_epoch=lambda row, ckpt: seen.append(row["epoch"]))
    assert calls == [300, 300]  # once per variant run, not again on resume
    assert seen == [3, 4]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole["history"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]] == strip
