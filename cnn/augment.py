"""Batched, on-device augmentation: a variant is a list of steps over whole batches.

Every step maps a float batch (B, 3, 32, 32), already normalised, to one of the
same shape on the same device, drawing its randomness from the generator it is
given, so a seeded run is repeatable. No PIL, no per-image Python loop, no
DataLoader workers (the airbench way).
"""
from __future__ import annotations

from typing import Callable

import torch

# CIFAR-10 training-set channel statistics, on the 0..1 scale
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

Step = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float, channels_last."""
    mean = torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return ((x.to(dtype) - mean) / std).contiguous(memory_format=torch.channels_last)


def _uniform(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device).to(device)


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = _uniform(len(x), g, x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def translate(x: torch.Tensor, g: torch.Generator, pad: int = 4, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Pad-and-crop: shift each image by (dy, dx) in [-pad, pad], reflect-padded.

    `offsets` (B, 2) int overrides the random draw (used by tests). Done as two
    passes of 2*pad+1 masked slices each, not a per-image loop."""
    n, _, h, w = x.shape
    if offsets is None:
        offsets = (_uniform(2 * n, g, x.device).view(n, 2) * (2 * pad + 1)).long() - pad
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.empty((n, x.shape[1], h, w + 2 * pad), dtype=x.dtype, device=x.device)
    for d in range(-pad, pad + 1):  # vertical shift
        m = offsets[:, 0] == d
        rows[m] = padded[m, :, pad + d : pad + d + h, :]
    out = torch.empty_like(x)
    for d in range(-pad, pad + 1):  # horizontal shift
        m = offsets[:, 1] == d
        out[m] = rows[m, :, :, pad + d : pad + d + w]
    return out.contiguous(memory_format=torch.channels_last)


def cutout(x: torch.Tensor, g: torch.Generator, size: int = 8, centers: torch.Tensor | None = None) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) centred at a random pixel.

    Zero is the mean after normalisation. `centers` (B, 2) int overrides the draw."""
    n, _, h, w = x.shape
    if centers is None:
        centers = (_uniform(2 * n, g, x.device).view(n, 2) * torch.tensor([h, w], device=x.device)).long()
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    cy, cx = centers[:, 0].view(-1, 1, 1), centers[:, 1].view(-1, 1, 1)
    lo = size // 2
    inside = (ys >= cy - lo) & (ys < cy - lo + size) & (xs >= cx - lo) & (xs < cx - lo + size)  # (B, H, W)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3) -> torch.Tensor:
    """Colour jitter per image: brightness shift, contrast and saturation scale."""
    n = len(x)
    u = _uniform(3 * n, g, x.device).view(3, n, 1, 1, 1) * 2 - 1  # in [-1, 1)
    x = x + u[0] * brightness / 0.25  # a shift of `brightness` on the 0..1 scale, ~1/0.25 std units
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u[1] * contrast) + mean
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * (1 + u[2] * saturation) + grey


VARIANTS: dict[str, list[Step]] = {
    "none": [],
    "flip": [flip],
    "crop": [translate],
    "flip-crop": [flip, translate],
    "flip-crop-cutout": [flip, translate, cutout],
    "flip-crop-jitter": [flip, translate, jitter],
}


def check_variants(names: list[str]) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; known variants: {', '.join(VARIANTS)}")


def augment(x: torch.Tensor, variant: str, g: torch.Generator) -> torch.Tensor:
    """Apply the variant's steps in order to a normalised float batch."""
    for step in VARIANTS[variant]:
        x = step(x, g)
    return x
