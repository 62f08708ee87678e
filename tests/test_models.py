"""The model registry and the seed network's structure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnn.config import make_config
from cnn.models import MODELS, RECIPES, build_model


def test_seed_structure():
    model = build_model("seed")
    layers = list(model.modules())
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    norms = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert len(convs) == 6 and len(norms) == 6 and len(linears) == 2
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [n.num_features for n in norms] == [c.out_channels for c in convs]
    widths = [c.out_channels for c in convs]
    assert widths == sorted(widths) and widths[-1] > widths[0]  # channels grow with depth
    # the order of the feature layers: a pool right after conv 3's block and conv 6's block
    order = [type(m).__name__ for m in model.features]
    assert order == ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["MaxPool2d"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + [
        "MaxPool2d"]
    # ReLU after every layer but the last
    head = [type(m).__name__ for m in model.classifier]
    assert head == ["Flatten", "Linear", "ReLU", "Linear"]


def test_seed_output_shape():
    model = build_model("seed", num_classes=7).eval()
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 7)
    with pytest.raises(ValueError, match="widths must list 6"):
        build_model("seed", widths=(8, 8))


def test_registry_lists_known_models():
    assert {"seed", "fast"} <= set(MODELS) and set(MODELS) == set(RECIPES)
    with pytest.raises(ValueError, match="unknown model 'resnet'; known models: fast, seed"):
        build_model("resnet")
    with pytest.raises(ValueError, match="unknown model"):
        make_config("resnet", "none", epochs=1, patience=1, seed=0)


def test_make_config_takes_the_recipe_and_the_overrides():
    fast = make_config("fast", "flip-crop", epochs=10, patience=3, seed=1)
    r = RECIPES["fast"]
    assert (fast.lr, fast.batch_size, fast.momentum, fast.label_smoothing) == (r.lr, r.batch_size, r.momentum, 0.2)
    assert fast.schedule == "warmup-linear" and fast.tta == 2 and fast.lookahead and fast.alt_flip
    assert fast.norm_lr_scale == 64 and not fast.compile
    seed = make_config("seed", "none", epochs=2, patience=1, seed=0, batch_size=32, lr=0.01, compile=True)
    assert (seed.batch_size, seed.lr, seed.compile) == (32, 0.01, True)
    assert seed.schedule == "onecycle" and seed.tta == 0 and not seed.lookahead and not seed.alt_flip
