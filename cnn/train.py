"""Train one model on one augmentation variant: the loop, early stopping, checkpoints.

A checkpoint after every epoch lets a restarted variant resume with the same history
and random streams. `train()` is re-entrant: variants may train at once in threads of
one process, so all randomness comes from per-call generators.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnn.augment import make_batch, normalize
from cnn.checkpoint import CHECKPOINT, LoopState, load_checkpoint, save_checkpoint
from cnn.config import TrainConfig
from cnn.data import Splits
from cnn.device import prepare_device
from cnn.evaluate import evaluate, predict_logits
from cnn.fast import Lookahead
from cnn.models import build_model

EVAL_BATCH = 512


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Stopped(Exception):
    """STOP was set: the epoch in progress is dropped; a resume starts after the last one."""


# Process-wide, like the signal that sets it (cli/interrupt.py): every loop stops at its next batch.
STOP = threading.Event()


def variants_that_fit(cfg: TrainConfig, device: torch.device, train_images: int, wanted: int,
                      headroom: float = 0.8) -> int:
    """How many variants of `cfg` may train at once on `device`, at most `wanted`. On CUDA,
    `headroom` of the free memory over a throwaway model's measured peak plus its images."""
    if wanted < 1:
        raise ValueError(f"variants per device must be at least 1, found {wanted}")
    if device.type != "cuda":
        return wanted
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = init_model(cfg, 10, device)
    opt = make_optimizer(model, cfg)
    amp = cfg.precision == "bf16"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = model(torch.zeros((cfg.batch_size, 3, 32, 32), device=device)).float().sum()
    loss.backward()
    opt.step()
    predict_logits(model, torch.zeros((EVAL_BATCH, 3, 32, 32), dtype=torch.uint8), device, EVAL_BATCH,
                   tta=cfg.tta, amp=amp)
    need = torch.cuda.max_memory_allocated(device) - base + train_images * 3 * 32 * 32
    del model, opt, loss
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(wanted, int(headroom * free // need)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Nesterov SGD; BatchNorm parameters, at `norm_lr_scale` x lr, are decayed (with `norm_decay`)
    by weight_decay / norm_lr_scale so that the fraction removed per step matches the weights'."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if id(p) not in norm and p.ndim > 1], "lr": cfg.lr,
         "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if id(p) not in norm and p.ndim <= 1], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [p for p in trained if id(p) in norm], "lr": cfg.lr * cfg.norm_lr_scale,
         "weight_decay": cfg.weight_decay / cfg.norm_lr_scale if cfg.norm_decay else 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        peaks = [g["lr"] for g in opt.param_groups]
        # at least two warm-up steps: OneCycleLR divides by (warm-up steps - 1)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=max(total, 4),
                                                   pct_start=max(0.25, 2.0 / max(total, 4)))
    if cfg.schedule == "warmup-linear":
        # step s's factor is the value after s + 1 steps
        warm = max(1, int(cfg.warmup * total))
        a, b = cfg.lr_start, cfg.lr_end

        def factor(s: int) -> float:
            if s < warm:
                return a + (1 - a) * (s + 1) / warm
            return b + (1 - b) * max(0.0, (total - s) / max(1, total - warm))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    raise ValueError(f"Invalid schedule {cfg.schedule!r}. Only onecycle and warmup-linear are supported.")


def train_one_epoch(model, opt, sched, x_u8, y, cfg: TrainConfig, gen: torch.Generator, device, amp: bool,
                    epoch: int = 1, flip_bits: torch.Tensor | None = None, lookahead: Lookahead | None = None,
                    on_progress: Callable[[int, int, float], None] | None = None,
                    progress_every: float = 15.0) -> float:
    """One pass over the shuffled training set; returns the mean training loss. Image k is
    mirrored in epoch e iff flip_bits[k] xor (e even). `on_progress` runs at most every
    `progress_every` seconds, so a long epoch (a CPU's) shows signs of life."""
    model.train()
    n = len(y)
    steps = max(1, n // cfg.batch_size)  # drop the ragged last batch: fixed shapes
    perm = torch.randperm(n, generator=gen, device=gen.device).to(device)
    total = torch.zeros((), device=device)
    start = last_report = time.perf_counter()
    for i in range(steps):
        if STOP.is_set():
            raise Stopped(f"stopped at step {i} of {steps} of epoch {epoch}")
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        flip_mask = None if flip_bits is None else flip_bits[idx] ^ (epoch % 2 == 0)
        xb = make_batch(x_u8, idx, cfg.variant, gen, flip_mask=flip_mask)
        yb = y[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if lookahead is not None:
            lookahead.step((epoch - 1) * steps + i + 1)
        total += loss.detach()
        # a host sync every 50 steps only: the device runs ahead of Python in between
        if (i % 50 == 0 or i == steps - 1) and not math.isfinite(loss.item()):
            raise Diverged(f"non-finite training loss at step {i} of epoch {epoch}")
        # the clock, not a host sync: on CUDA the rate may count a few queued steps early
        if on_progress is not None and time.perf_counter() - last_report >= progress_every:
            last_report = time.perf_counter()
            on_progress(i + 1, steps, (i + 1) * cfg.batch_size / (last_report - start))
    if lookahead is not None:
        lookahead.sync()
    mean = (total / steps).item()
    if not math.isfinite(mean):
        raise Diverged(f"non-finite mean training loss in epoch {epoch}")
    return mean


# Initialisation draws from the global RNG (reset_parameters takes no generator): under this
# lock, with the state saved and restored, a seeded model is the same whatever other threads do.
_INIT_LOCK = threading.Lock()


def init_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes=num_classes)
    return model.to(device, memory_format=torch.channels_last)


# torch.compile's cache (guarded on shapes, dtypes, grad mode, train/eval) is shared by every
# model of the class, so each key is warmed once per process, on a copy so the real model's
# state is untouched, under a lock so that variants starting together do not compile twice.
_COMPILE_LOCK = threading.Lock()
_WARMED: set[tuple] = set()


def compile_model(model: nn.Module, cfg: TrainConfig, device: torch.device, amp: bool) -> nn.Module:
    key = (type(model).__qualname__, cfg.model, str(device), cfg.batch_size, EVAL_BATCH, int(cfg.tta), amp,
           tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    with _COMPILE_LOCK:
        if key not in _WARMED:
            twin = torch.compile(copy.deepcopy(model), dynamic=False)
            x = torch.zeros((cfg.batch_size, 3, 32, 32), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = twin(x)
            out.float().sum().backward()  # compiles the backward graph too
            predict_logits(twin, torch.zeros((1, 3, 32, 32), dtype=torch.uint8), device, EVAL_BATCH,
                           tta=cfg.tta, amp=amp, pad_last=True)
            _WARMED.add(key)
    return torch.compile(model, dynamic=False)


def train(
    cfg: TrainConfig,
    data: Splits,
    device: torch.device,
    workdir: Path,
    on_epoch: Callable[[dict, Path], None] | None = None,
    on_progress: Callable[[int, int, int, float], None] | None = None,
    until: int | None = None,
    may_start: Callable[[int, float | None], bool] | None = None,
) -> dict:
    """Train `cfg.variant`, resuming from `workdir/CHECKPOINT` if present. `on_epoch` is
    called after each epoch's checkpoint is written. `until`: pause after that epoch (status
    `paused`; the checkpoint resumes). `may_start(epoch, last_epoch_seconds)`: asked before
    each epoch; False stops the loop with status `stopped_by_budget` (the checkpoint, still
    running, resumes too)."""
    workdir.mkdir(parents=True, exist_ok=True)
    # on CUDA each call has its own stream, so variants sharing a GPU in threads overlap
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return _train(cfg, data, device, workdir / CHECKPOINT, on_epoch, on_progress, until, may_start)


def _train(cfg: TrainConfig, data: Splits, device: torch.device, ckpt_path: Path, on_epoch, on_progress=None,
           until: int | None = None, may_start=None) -> dict:
    amp = cfg.precision == "bf16"
    prepare_device(device)
    model = init_model(cfg, len(data.classes), device)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(data.train_y) // cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    lookahead = Lookahead(model, cfg.epochs * steps_per_epoch) if cfg.lookahead else None
    state = LoopState()

    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, model, opt, sched, gen, lookahead, cfg)
        if state.status != "running":
            return _result(state)
    elif hasattr(model, "init_from_data"):
        # not on resume: the checkpoint holds the result
        model.init_from_data(normalize(data.train_x[:5000].to(device)))

    fwd = compile_model(model, cfg, device, amp) if cfg.compile else model
    x_train, y_train = data.train_x.to(device), data.train_y.to(device)
    # alternating flip: a fixed coin per image, drawn from the seed (the same after a resume)
    flip_bits = None
    if cfg.alt_flip:
        flip_bits = (torch.rand(len(y_train), generator=torch.Generator().manual_seed(cfg.seed)) < 0.5).to(device)
    pad_eval = cfg.compile or device.type == "cuda"
    stop = cfg.epochs if until is None else min(until, cfg.epochs)
    while state.epoch < stop:
        epoch = state.epoch + 1
        if may_start is not None and not may_start(epoch, state.history[-1]["seconds"] if state.history else None):
            return _result(state, "stopped_by_budget")
        t0 = time.perf_counter()
        progress = None if on_progress is None else functools.partial(on_progress, epoch)
        try:
            train_loss = train_one_epoch(fwd, opt, sched, x_train, y_train, cfg, gen, device, amp,
                                         epoch=epoch, flip_bits=flip_bits, lookahead=lookahead, on_progress=progress)
        except Diverged as e:
            state.status, state.error, state.epoch = "diverged", str(e), epoch
            break
        val = evaluate(fwd, data.val_x, data.val_y, device, batch_size=EVAL_BATCH, tta=cfg.tta, amp=amp,
                       pad_last=pad_eval)
        seconds = time.perf_counter() - t0
        state.seconds += seconds
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "lr": opt.param_groups[0]["lr"], "seconds": seconds}
        _record_epoch(state, cfg, model, row, val["predicted"])
        save_checkpoint(ckpt_path, model, opt, sched, gen, lookahead, cfg, state)
        if on_epoch:
            on_epoch(row, ckpt_path)
        if state.status != "running":
            break
    if state.status == "diverged":
        save_checkpoint(ckpt_path, model, opt, sched, gen, lookahead, cfg, state)
    return _result(state, "paused" if state.status == "running" else state.status)


def _record_epoch(state: LoopState, cfg: TrainConfig, model: nn.Module, row: dict, predicted: torch.Tensor) -> None:
    state.history.append(row)
    state.epoch = row["epoch"]
    if row["val_loss"] < state.best_val_loss:
        state.best_epoch, state.best_val_loss, state.bad_epochs = state.epoch, row["val_loss"], 0
        state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.best_predictions = predicted
    else:
        state.bad_epochs += 1
    if state.bad_epochs >= cfg.patience:
        state.status = "early_stopped"
    elif state.epoch == cfg.epochs:
        state.status = "completed"


def _result(state: LoopState, status: str | None = None) -> dict:
    """`status` overrides a checkpoint's `running`: paused at a rung, or stopped by the budget."""
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    return {
        "status": status or state.status,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch or None,
        "val_loss": best["val_loss"] if best else None,
        "val_accuracy": best["val_accuracy"] if best else None,
        "seconds": round(state.seconds, 3),
        "history": state.history,
        "best_state": state.best_state,
        "best_predictions": state.best_predictions,
        "error": state.error,
    }
