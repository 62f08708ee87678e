"""Evaluate a model on a fixed split: loss, accuracy, per-class accuracy, confusion.

Evaluation never shuffles or augments; with `tta` the prediction averages the
image and its mirror (the airbench test-time augmentation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cnn.augment import normalize


@torch.no_grad()
def predict_logits(model, x_u8: torch.Tensor, device, batch_size: int = 512, tta: bool = False, amp: bool = False) -> torch.Tensor:
    """Logits (N, classes) in float32 on the CPU, in the order of `x_u8`."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        xb = normalize(x_u8[i : i + batch_size].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb)
            if tta:
                logits = 0.5 * (logits + model(xb.flip(-1)))
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model, x_u8: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512,
             tta: bool = False, amp: bool = False, num_classes: int | None = None) -> dict:
    """Metrics on one split. `confusion[i][j]` counts true class i predicted as j."""
    logits = predict_logits(model, x_u8, device, batch_size, tta, amp)
    y = y.cpu()
    k = num_classes or logits.shape[1]
    pred = logits.argmax(1)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (pred == y).float().mean().item(),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "n": len(y),
    }
