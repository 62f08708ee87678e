"""Progress within an epoch: a long epoch says how far it is every so often, at a
terminal only (cnn/train.py train_one_epoch, tasks/training.py terminal_progress)."""
from __future__ import annotations

import functools
import io
import time

import torch
from torch import nn

from cnn import train as train_module
from cnn.config import make_config
from cnn.data import Splits
from cnn.train import train, train_one_epoch
from tasks.training import terminal_progress
from tests.conftest import register_tiny

CPU = torch.device("cpu")


class Slow(nn.Module):
    """A linear classifier that takes `seconds` per forward pass: a slow epoch, quickly."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.fc, self.starts = seconds, nn.Linear(3 * 32 * 32, 10), []

    def forward(self, x):
        self.starts.append(time.perf_counter())
        time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def slow_epoch(on_progress, every: float, steps: int = 40, batch: int = 8, seconds: float = 0.02) -> list[float]:
    """One epoch of `steps` steps; returns when each step began."""
    model = Slow(seconds)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = make_config("seed", "none", epochs=1, patience=1, seed=0, batch_size=batch)
    x = torch.randint(0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (steps * batch,))
    train_one_epoch(model, opt, sched, x, y, cfg, torch.Generator().manual_seed(0), CPU, amp=False,
                    on_progress=on_progress, progress_every=every)
    return model.starts


def test_a_slow_epoch_reports_progress_every_interval():
    calls = []
    before = time.perf_counter()  # the loop's clock starts after this, and before the first step
    starts = slow_epoch(lambda *a: calls.append((time.perf_counter(), *a)), every=0.1)  # 40 steps of 0.02 s
    assert len(calls) >= 4
    times = [before] + [c[0] for c in calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    longest_step = max(b - a for a, b in zip(starts, starts[1:]))  # more than 0.02 s on a busy machine
    setup = starts[0] - before  # the shuffle and the first batch, before the first step
    # never more often than asked, and at most one step later than asked (the 5 ms: when
    # this callback reads the clock, a little after the loop did)
    assert 0.1 <= gaps[0] <= 0.1 + setup + longest_step + 0.05, (gaps, setup, longest_step)
    assert all(0.1 - 0.005 <= g <= 0.1 + longest_step + 0.05 for g in gaps[1:]), (gaps, longest_step)
    steps = [c[1] for c in calls]
    assert steps == sorted(set(steps)) and all(c[2] == 40 for c in calls)
    assert all(0 < c[3] <= 8 / 0.02 for c in calls)  # images/s so far: at most a batch per sleep


def test_no_progress_within_a_fast_epoch_or_when_not_asked():
    calls = []
    slow_epoch(lambda *a: calls.append(a), every=60, steps=5)
    assert calls == []
    slow_epoch(None, every=0, steps=5)  # no callback: nothing to call, the epoch trains as before


def test_train_passes_the_epoch_to_the_progress_callback(monkeypatch, tmp_path):
    register_tiny(monkeypatch)
    monkeypatch.setattr(train_module, "train_one_epoch", functools.partial(train_one_epoch, progress_every=0))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    data = Splits(x, y, x[:32], y[:32], x[:32], y[:32], [str(i) for i in range(10)])
    calls = []
    cfg = make_config("tiny", "none", epochs=2, patience=2, seed=0, batch_size=32)
    train(cfg, data, CPU, tmp_path, on_progress=lambda *a: calls.append(a[:3]))
    assert calls == [(e, s, 4) for e in (1, 2) for s in range(1, 5)]  # every step: progress_every=0


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_at_a_terminal_only(capsys):
    assert terminal_progress("flip", 30, 128, 50_000, stream=Stream(tty=False)) is None  # a deployment's logs
    show = terminal_progress("flip", 30, 128, 50_000, stream=Stream(tty=True))
    show(3, 100, 390, 590.4)
    assert capsys.readouterr().out == "flip epoch 3/30: 12,800/50,000 images, 590 images/s\n"
