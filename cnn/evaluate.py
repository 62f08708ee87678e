"""Evaluate a model on a fixed split: loss, accuracy, per-class accuracy, confusion.

Evaluation never shuffles or augments. Test-time augmentation (airbench's levels):
`tta=0` the image alone; `1` the mean of the image's and its mirror's logits;
`2` half of that plus half the mean over the image shifted one pixel up-left and
one pixel down-right (reflected at the border), each with its mirror: six views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cnn.augment import normalize


def tta_views(x: torch.Tensor, tta: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, batch) pairs whose weighted logits sum to the prediction."""
    if tta not in (0, 1, 2):
        raise ValueError(f"tta must be 0 (none), 1 (mirror) or 2 (mirror + shifts), found {tta!r}")
    if tta == 0:
        return [(1.0, x)]
    mirrored = [(0.5, x), (0.5, x.flip(-1))]
    if tta == 1:
        return mirrored
    views = [(0.5 * w, v) for w, v in mirrored]
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    for a in (0, 2):  # content moves down-right, then up-left, by one pixel (as translate by -1, +1)
        shifted = padded[:, :, a : a + h, a : a + w]  # a slice, so any batch size exports
        views += [(0.125, shifted), (0.125, shifted.flip(-1))]
    return views


@torch.inference_mode()
def predict_logits(model, x_u8: torch.Tensor, device, batch_size: int = 512, tta: int = 0, amp: bool = False,
                   pad_last: bool = False) -> torch.Tensor:
    """Float32 logits on the CPU. `pad_last` pads the last batch so that every call has one
    shape (no recompile, no cudnn re-plan); in eval mode padding cannot change other rows."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        chunk = x_u8[i : i + batch_size].to(device)
        n = len(chunk)
        if pad_last and n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
        xb = normalize(chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            views = tta_views(xb, int(tta))
            logits = sum(w * model(v.contiguous(memory_format=torch.channels_last)).float() for w, v in views)
        out.append(logits[:n])
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0)


def evaluate(model, x_u8: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512,
             tta: int = 0, amp: bool = False, num_classes: int | None = None, pad_last: bool = False) -> dict:
    """`confusion[i][j]` counts true class i predicted as j."""
    logits = predict_logits(model, x_u8, device, batch_size, tta, amp, pad_last)
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
        "predicted": pred.to(torch.uint8),
    }
