"""The models: each is one builder function registered under a name with its `Recipe`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cnn.fast import FastNet


@dataclass(frozen=True)
class Recipe:
    """Training defaults that belong to a model (a run's parameters override lr and batch size)."""

    lr: float  # peak learning rate, for the mean loss over a batch
    batch_size: int
    weight_decay: float  # PyTorch SGD's coefficient, on weights (not biases)
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.2  # warmup-linear: fraction of steps to the peak
    lr_start: float = 0.0  # warmup-linear: first and last learning rate, as fractions of the peak
    lr_end: float = 0.0
    norm_lr_scale: float = 1.0
    norm_decay: bool = False
    lookahead: bool = False
    alt_flip: bool = False  # `flip` alternates per image every epoch instead of a fresh coin
    tta: int = 0  # cnn.evaluate's levels


MODELS: dict[str, Callable[..., nn.Module]] = {}
RECIPES: dict[str, Recipe] = {}


def register(name: str, recipe: Recipe):
    def wrap(fn):
        MODELS[name] = fn
        RECIPES[name] = recipe
        return fn

    return wrap


def check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")


def build_model(name: str, **kwargs) -> nn.Module:
    check_model(name)
    return MODELS[name](**kwargs)


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register("seed", Recipe(lr=0.05, batch_size=128, weight_decay=5e-4, momentum=0.9))
class SeedNet(nn.Module):
    """The notebook's CNN: 6 conv(3x3)+BN+ReLU, max-pool after conv 3 and 6, 2 FC layers."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128), hidden: int = 256, num_classes: int = 10):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"seed model: widths must list 6 conv widths, found {len(widths)}: {widths}")
        c = [3, *widths]
        self.features = nn.Sequential(
            *conv_bn(c[0], c[1]), *conv_bn(c[1], c[2]), *conv_bn(c[2], c[3]),
            nn.MaxPool2d(2),
            *conv_bn(c[3], c[4]), *conv_bn(c[4], c[5]), *conv_bn(c[5], c[6]),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[6] * 8 * 8, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# airbench94's lr 11.5 and decay 0.0153 per 1024 images are for a summed loss, divided by
# 1 + 1/(1 - momentum) = 7.67: on the mean loss lr = 11.5 / 7.67 = 1.5, and decay 0.0153 / 11.5
# keeps lr x decay (the fraction of each weight removed per step) at airbench's.
FAST_RECIPE = Recipe(
    lr=1.5, batch_size=1024, weight_decay=0.0153 / 11.5, momentum=0.85, label_smoothing=0.2,
    schedule="warmup-linear", warmup=0.23, lr_start=0.2, lr_end=0.07,
    norm_lr_scale=64.0, norm_decay=True, lookahead=True, alt_flip=True, tta=2,
)

register("fast", FAST_RECIPE)(FastNet)
