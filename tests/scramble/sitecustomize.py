"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the fan-out
tests' server, workers, flow runs and CLI calls): registers `scramble`, a test-only variant
that replaces every training image with noise, so successive halving has a unit that is
clearly worse. The variant is added when cnn.augment is first imported, so a process that
never imports it (a `prefect` command) does not pay for torch."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "cnn.augment"


def scramble(x, g):
    import torch

    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


class _AddScramble(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # the real finder, once
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.VARIANTS.setdefault("scramble", [scramble])

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "sitecustomize":  # imported by a test for `scramble` itself: no hook
    sys.meta_path.insert(0, _AddScramble())
