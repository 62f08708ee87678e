"""A portable model: a `torch.export` program with the input normalisation inside.

It loads with torch alone, no project code:

    m = torch.export.load("model.pt2").module()
    logits = m(images)  # images: float (B, 3, 32, 32), RGB in 0..1
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cnn.augment import MEAN, STD
from cnn.evaluate import tta_views
from store.files import publishing


class Portable(nn.Module):
    """0..1 RGB images in, logits out, with the recipe's test-time augmentation
    (the same views as `cnn.evaluate`, so it reproduces the reported metrics)."""

    def __init__(self, model: nn.Module, tta: int):
        super().__init__()
        self.model = model.eval()
        self.tta = int(tta)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return sum(w * self.model(v) for w, v in tta_views(x, self.tta))


def export_portable(model: nn.Module, path: Path, tta: int = 0) -> Path:
    """Export `model` (CPU, fp32, eval) with normalisation to `path` (.pt2), and check it."""
    # contiguous weights: channels_last parameters do not serialise as whole tensors
    portable = Portable(model.float().cpu().to(memory_format=torch.contiguous_format), tta).eval()
    example = torch.rand(4, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(portable, (example,), dynamic_shapes={"x": {0: batch}})
    with publishing(path, suffix=".pt2") as tmp:  # torch.export wants the .pt2 suffix
        torch.export.save(program, tmp)
        reloaded = torch.export.load(tmp).module()
        with torch.no_grad():
            if not torch.allclose(reloaded(example), portable(example), atol=1e-4):
                raise RuntimeError(f"{path}: the exported model does not reproduce the original's outputs")
    return Path(path)
