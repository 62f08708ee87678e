"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the fan-out
tests' server, workers, flow runs and CLI calls): adds the suite's test-only entries to the
product's registries, as tests/conftest.py does in the pytest process:
- `scramble`, a variant that replaces every training image with noise, so successive
  halving has a unit that is clearly worse;
- `tiny`, the seed network at small widths with the seed recipe: the same training loop at
  about a thirteenth of the CPU a step, for runs whose epochs need not be long;
- `paced`, `tiny` whose training steps also wait as long as the seed network computes, for
  runs that are killed or raced mid-training: epochs as long as the seed network's, at
  tiny's CPU, as a GPU node's process spends its step waiting on the device.
Each is added when its registry's module is first imported, so a process that never imports
it (a `prefect` command) does not pay for torch. With TRAIN_CIFAR_TEST_STUCK_THREAD set, it
also starts a thread that never ends, for the worker's bounded exit (tests/test_deployments.py)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

TINY_WIDTHS = (8, 8, 16, 16, 16, 16)
TINY_HIDDEN = 32
# a 128-image step of the seed network takes 1.0 to 1.3 s on one thread here, tiny's 0.1 s
PACE_S_PER_IMAGE = 1.0 / 128


def scramble(x, g):
    import torch

    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def tiny(num_classes: int = 10):
    from cnn.models import SeedNet

    return SeedNet(TINY_WIDTHS, TINY_HIDDEN, num_classes)


def _wait_as_the_seed_network_computes(net, args) -> None:
    if net.training:
        time.sleep(PACE_S_PER_IMAGE * len(args[0]))


def paced(num_classes: int = 10):
    net = tiny(num_classes)
    net.register_forward_pre_hook(_wait_as_the_seed_network_computes)
    return net


# each trains with the seed network's recipe (tests/conftest.py registers them from here too)
TEST_MODELS = {"tiny": tiny, "paced": paced}


def _add_scramble(module) -> None:
    module.VARIANTS.setdefault("scramble", [scramble])


def _add_models(module) -> None:
    for name, build in TEST_MODELS.items():
        module.MODELS.setdefault(name, build)
        module.RECIPES.setdefault(name, module.RECIPES["seed"])


class _AddEntries(importlib.abc.MetaPathFinder):
    def __init__(self, hooks: dict):
        self.hooks = dict(hooks)

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        add = self.hooks.pop(name)
        if not self.hooks:
            sys.meta_path.remove(self)
        # the real finder (this one no longer answers for `name`)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            add(module)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "sitecustomize":  # imported by a test for its entries: no hooks
    sys.meta_path.insert(0, _AddEntries({"cnn.augment": _add_scramble, "cnn.models": _add_models}))
    if os.environ.get("TRAIN_CIFAR_TEST_STUCK_THREAD"):
        # a thread that is not a daemon and never ends, as a library's thread blocked in a
        # call without a timeout: Python's exit would wait on it for good (test_deployments)
        import threading

        threading.Thread(target=threading.Event().wait, name="stuck-for-the-test").start()
