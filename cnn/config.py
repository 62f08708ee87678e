"""What decides a variant's training: TrainConfig, filled from a model's recipe
(cnn.models) with the run's overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cnn.models import RECIPES, check_model

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Saved in every checkpoint, which resumes only under the config it was written with."""

    model: str
    variant: str
    epochs: int  # maximum; early stopping may end sooner
    patience: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    schedule: str
    tta: int  # True/False mean 1/0
    seed: int
    compile: bool = False
    warmup: float = 0.2
    lr_start: float = 0.0
    lr_end: float = 0.0
    norm_lr_scale: float = 1.0
    norm_decay: bool = False
    lookahead: bool = False
    alt_flip: bool = False
    precision: str = "fp32"  # bf16 is autocast: weights, optimizer and BatchNorm stay fp32


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'auto' is bf16 autocast on CUDA and fp32 on the CPU; 'fp32' and 'bf16' are as named."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected auto, fp32 or bf16, found {precision!r}")
    return precision


def make_config(model: str, variant: str, *, epochs: int, patience: int, seed: int,
                batch_size: int | None = None, lr: float | None = None, compile: bool = False,
                precision: str = "fp32") -> TrainConfig:
    """`precision` is fp32 or bf16: resolve 'auto' first (resolve_precision)."""
    check_model(model)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}")
    r = dataclasses.asdict(RECIPES[model])
    r.update(batch_size=batch_size or r["batch_size"], lr=r["lr"] if lr is None else lr)
    return TrainConfig(model=model, variant=variant, epochs=epochs, patience=patience, seed=seed, compile=compile,
                       precision=precision, **r)
