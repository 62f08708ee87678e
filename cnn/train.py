"""Train one model on one augmentation variant: the loop, early stopping, checkpoints.

The loop is written out (set lr, forward, backward, step, log). After every
epoch a full checkpoint (model, optimizer, scheduler, epoch, RNG state,
history, config, best weights) is written, so a restarted variant resumes at
the next epoch with the same history. A non-finite loss ends the variant as
`diverged`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnn.augment import augment, normalize
from cnn.data import Splits
from cnn.evaluate import evaluate
from cnn.models import RECIPES, build_model

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a variant's training; saved inside every checkpoint."""

    model: str
    variant: str
    epochs: int  # maximum; early stopping may end sooner
    patience: int  # epochs without a better validation loss before stopping
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    schedule: str
    tta: bool
    seed: int
    compile: bool = False


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def make_config(model: str, variant: str, *, epochs: int, patience: int, seed: int,
                batch_size: int | None = None, lr: float | None = None, compile: bool = False) -> TrainConfig:
    """A config from the model's recipe, with the run's overrides."""
    r = RECIPES[model]
    return TrainConfig(
        model=model, variant=variant, epochs=epochs, patience=patience,
        batch_size=batch_size or r.batch_size, lr=r.lr if lr is None else lr,
        momentum=r.momentum, weight_decay=r.weight_decay, label_smoothing=r.label_smoothing,
        schedule=r.schedule, tta=r.tta, seed=seed, compile=compile,
    )


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on BatchNorm and biases (1-d parameters)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # at least two warm-up steps: OneCycleLR divides by (warm-up steps - 1)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 4),
                                                   pct_start=max(0.25, 2.0 / max(total, 4)))
    if cfg.schedule == "warmup-linear":  # linear up for 20% of steps, then linearly down to 0
        warm = max(1, int(0.2 * total))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm))
        )
    raise ValueError(f"Invalid schedule {cfg.schedule!r}. Only onecycle and warmup-linear are supported.")


def train_one_epoch(model, opt, sched, x_u8, y, cfg: TrainConfig, gen: torch.Generator, device, amp: bool) -> float:
    """One pass over the shuffled training set; returns the mean training loss."""
    model.train()
    n = len(y)
    steps = max(1, n // cfg.batch_size)  # drop the ragged last batch: fixed shapes
    perm = torch.randperm(n, generator=gen, device=gen.device).to(device)
    total = torch.zeros((), device=device)
    for i in range(steps):
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        xb = augment(normalize(x_u8[idx]), cfg.variant, gen)  # (B, 3, 32, 32) float
        yb = y[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach()
        if not math.isfinite(loss.item() if i % 50 == 0 or i == steps - 1 else 0.0):
            raise Diverged(f"non-finite training loss at step {i}")
    mean = (total / steps).item()
    if not math.isfinite(mean):
        raise Diverged("non-finite mean training loss")
    return mean


def _rng_state(gen: torch.Generator) -> dict:
    state = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: TrainConfig,
    data: Splits,
    device: torch.device,
    workdir: Path,
    on_epoch: Callable[[dict, Path], None] | None = None,
) -> dict:
    """Train `cfg.variant`, resuming from `workdir/checkpoint.pt` if present.

    `on_epoch(row, checkpoint_path)` is called after each epoch's checkpoint is
    written (the caller logs, uploads, updates the UI). Returns the result:
    status, epochs_run, best_epoch, val_loss, val_accuracy, seconds, history,
    and `best_state` (the best epoch's weights, on the CPU)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / CHECKPOINT
    torch.manual_seed(cfg.seed)
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg.model, num_classes=len(data.classes)).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(data.train_y) // cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    state = {"epoch": 0, "history": [], "best_epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0,
             "best_state": None, "seconds": 0.0, "status": "running"}

    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{ckpt_path}: checkpoint was written with a different config; "
                             f"expected {dataclasses.asdict(cfg)}, found {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(gen, ckpt["rng"])
        state = ckpt["state"]
        if state["status"] != "running":  # already finished: nothing to redo
            return _result(state)

    fwd = torch.compile(model) if cfg.compile else model
    x_train, y_train = data.train_x.to(device), data.train_y.to(device)  # uint8 on the device, moved once
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        try:
            train_loss = train_one_epoch(fwd, opt, sched, x_train, y_train, cfg, gen, device, amp)
        except Diverged as e:
            state["status"], state["error"] = "diverged", str(e)
            state["epoch"] = epoch
            break
        val = evaluate(fwd, data.val_x, data.val_y, device, batch_size=512, tta=cfg.tta, amp=amp)
        seconds = time.perf_counter() - t0
        state["seconds"] += seconds
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "lr": opt.param_groups[0]["lr"], "seconds": seconds}
        state["history"].append(row)
        state["epoch"] = epoch
        if val["loss"] < state["best_val_loss"]:
            state.update(best_epoch=epoch, best_val_loss=val["loss"], bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        if state["bad_epochs"] >= cfg.patience:
            state["status"] = "early_stopped"
        elif epoch == cfg.epochs:
            state["status"] = "completed"
        _save_checkpoint(ckpt_path, model, opt, sched, gen, cfg, state)
        if on_epoch:
            on_epoch(row, ckpt_path)
        if state["status"] != "running":
            break
    if state["status"] == "diverged":
        _save_checkpoint(ckpt_path, model, opt, sched, gen, cfg, state)
    return _result(state)


def _save_checkpoint(path: Path, model, opt, sched, gen, cfg: TrainConfig, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state(gen), "config": dataclasses.asdict(cfg), "state": state}, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def _result(state: dict) -> dict:
    best = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), None)
    return {
        "status": state["status"],
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"] or None,
        "val_loss": best["val_loss"] if best else None,
        "val_accuracy": best["val_accuracy"] if best else None,
        "seconds": round(state["seconds"], 3),
        "history": state["history"],
        "best_state": state["best_state"],
        "error": state.get("error"),
    }
