"""Model registry: a model is one builder function, one name, and its recipe.

    @register("seed", Recipe(lr=0.05, ...))
    def seed(num_classes=10, **kw) -> nn.Module: ...

`build_model(name)` builds it; `RECIPES[name]` holds its training defaults
(the run's parameters override them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """Training defaults that belong to a model (a run's parameters override them)."""

    lr: float
    batch_size: int
    weight_decay: float
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # onecycle | warmup-linear
    tta: bool = False  # flip test-time augmentation at evaluation


MODELS: dict[str, Callable[..., nn.Module]] = {}
RECIPES: dict[str, Recipe] = {}


def register(name: str, recipe: Recipe):
    def wrap(fn):
        MODELS[name] = fn
        RECIPES[name] = recipe
        return fn

    return wrap


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SeedNet(nn.Module):
    """The notebook's CNN: 6 conv(3x3)+BN+ReLU, max-pool after conv 3 and 6, 2 FC layers."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128), hidden: int = 256, num_classes: int = 10):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"seed model: widths must list 6 conv widths, found {len(widths)}: {widths}")
        c = [3, *widths]
        self.features = nn.Sequential(
            *conv_bn(c[0], c[1]), *conv_bn(c[1], c[2]), *conv_bn(c[2], c[3]),
            nn.MaxPool2d(2),  # 32x32 -> 16x16
            *conv_bn(c[3], c[4]), *conv_bn(c[4], c[5]), *conv_bn(c[5], c[6]),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[6] * 8 * 8, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),  # logits: no ReLU on the output
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) float -> (B, classes)
        return self.classifier(self.features(x))


@register("seed", Recipe(lr=0.05, batch_size=128, weight_decay=5e-4, momentum=0.9))
def seed(num_classes: int = 10, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128), hidden: int = 256) -> nn.Module:
    return SeedNet(widths, hidden, num_classes)
