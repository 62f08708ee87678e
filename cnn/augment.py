"""Batched, on-device augmentation: a variant is a list of steps over whole batches.

Randomness comes only from the generator each step is given, so a seeded run is
repeatable. Moves (`flip`, `translate`) only choose where each pixel is read from,
so they commute with normalisation: `make_batch` composes a variant's leading moves
into one gather on the uint8 batch (a quarter of float32's bytes, one pass). Paints
(`cutout`, `jitter`) change the normalised float batch. `augment` is the plain
step-by-step definition that tests compare `make_batch` with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

Step = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Coords = tuple[torch.Tensor, torch.Tensor]  # source rows (B, H), cols (B, W)


def _to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """In x's layout: an in-place multiply and add, fast on NCHW (not broadcast innermost)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize: expected a uint8 image batch, found {x.dtype}")
    scale = torch.tensor([1 / (255 * s) for s in STD], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return x.to(dtype).mul_(scale).add_(shift)


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> normalised float, channels_last (what the models take)."""
    return _to_float(x, dtype).contiguous(memory_format=torch.channels_last)


def _uniform(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device).to(device)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n-1), 2n-2] reflected into [0, n), like F.pad(mode="reflect")."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] for any dtype, in one gather."""
    n, c, h, w = x.shape
    lin = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w)
    return x.reshape(n, c, h * w).gather(2, lin.expand(n, c, h * w)).view(n, c, h, w)


@dataclass(frozen=True)
class Move:
    """A step that only moves pixels: `coords(n, h, w, g, device, **kw)` draws where from."""

    name: str
    coords: Callable[..., Coords]

    def __call__(self, x: torch.Tensor, g: torch.Generator | None, **kw) -> torch.Tensor:
        rows, cols = self.coords(len(x), x.shape[-2], x.shape[-1], g, x.device, **kw)
        return gather_pixels(x, rows, cols)


def _flip_coords(n, h, w, g, device, mask: torch.Tensor | None = None) -> Coords:
    """`mask` (B,) bool overrides the coin."""
    if mask is None:
        mask = _uniform(n, g, device) < 0.5
    j = torch.arange(w, device=device)
    cols = torch.where(mask.view(n, 1), w - 1 - j, j)
    return torch.arange(h, device=device).expand(n, h), cols


def _translate_coords(n, h, w, g, device, pad: int = 4, offsets: torch.Tensor | None = None) -> Coords:
    """Pad-and-crop, reflected at the border; `offsets` (B, 2) int overrides the draw."""
    if not 0 <= pad < min(h, w):
        raise ValueError(f"translate: pad must be in [0, {min(h, w) - 1}] for {h}x{w} images, found {pad}")
    if offsets is None:
        offsets = (_uniform(2 * n, g, device).view(n, 2) * (2 * pad + 1)).long() - pad
    offsets = offsets.to(device=device, dtype=torch.long)
    rows = _reflect(torch.arange(h, device=device) + offsets[:, :1], h)
    cols = _reflect(torch.arange(w, device=device) + offsets[:, 1:], w)
    return rows, cols


flip = Move("flip", _flip_coords)
translate = Move("translate", _translate_coords)


def cutout(x: torch.Tensor, g: torch.Generator, size: int = 8, centers: torch.Tensor | None = None) -> torch.Tensor:
    """Zero (the mean, normalised) a size x size square; `centers` (B, 2) overrides the draw."""
    n, _, h, w = x.shape
    if centers is None:
        centers = (_uniform(2 * n, g, x.device).view(n, 2) * torch.tensor([h, w], device=x.device)).long()
    lo = centers.to(x.device).long() - size // 2
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    in_rows = ((ys >= lo[:, :1]) & (ys < lo[:, :1] + size)).to(x.dtype)
    in_cols = ((xs >= lo[:, 1:]) & (xs < lo[:, 1:] + size)).to(x.dtype)
    # a multiply by a 0/1 mask: ten times faster than masked_fill's broadcast
    keep = 1 - in_rows[:, None, :, None] * in_cols[:, None, None, :]
    return x * keep


def jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.3, contrast: float = 0.3,
           saturation: float = 0.3) -> torch.Tensor:
    """Brightness shift, then contrast and saturation scale, per image. All three are affine
    in the pixel's colour, so together x3 = A x + t with A = c (s I + (1 - s) J / C) and
    t = beta + (1 - c) mean(x): one batched (C x C) matrix product. Brightness is divided by
    0.25, about one std on the 0..1 scale."""
    n, ch, h, w = x.shape
    u = _uniform(3 * n, g, x.device).view(3, n) * 2 - 1
    beta, c, s = u[0] * brightness / 0.25, 1 + u[1] * contrast, 1 + u[2] * saturation
    eye = torch.eye(ch, device=x.device, dtype=x.dtype)
    avg = torch.full((ch, ch), 1 / ch, device=x.device, dtype=x.dtype)
    a = c.view(n, 1, 1) * (s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * avg)
    t = beta + (1 - c) * x.mean(dim=(1, 2, 3))
    out = torch.baddbmm(t.view(n, 1, 1).to(x.dtype), a.to(x.dtype), x.reshape(n, ch, h * w))
    return out.view(n, ch, h, w)


VARIANTS: dict[str, list[Step]] = {
    "none": [],
    "flip": [flip],
    "crop": [translate],
    "flip-crop": [flip, translate],
    "flip-crop-cutout": [flip, translate, cutout],
    "flip-crop-jitter": [flip, translate, jitter],
}


def check_variants(names: list[str]) -> None:
    if not names:
        raise ValueError(f"at least one variant is needed; known variants: {', '.join(VARIANTS)}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; known variants: {', '.join(VARIANTS)}")


def _steps(variant: str) -> list[Step]:
    check_variants([variant])
    return VARIANTS[variant]


def augment(x: torch.Tensor, variant: str, g: torch.Generator) -> torch.Tensor:
    for step in _steps(variant):
        x = step(x, g)
    return x


def make_batch(x_u8: torch.Tensor, idx: torch.Tensor, variant: str, g: torch.Generator,
               flip_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images `idx` of the uint8 dataset, augmented and normalised; `flip_mask` replaces
    `flip`'s coin. The batch stays NCHW: a channels_last model reorders it in its first
    convolution at no measurable cost, while a copy here would be a third of the time."""
    steps = _steps(variant)
    xb = x_u8.index_select(0, idx)
    n, _, h, w = xb.shape
    k = 0
    while k < len(steps) and isinstance(steps[k], Move):
        k += 1
    if k:
        rows = torch.arange(h, device=xb.device).expand(n, h)
        cols = torch.arange(w, device=xb.device).expand(n, w)
        for step in steps[:k]:
            kw = {"mask": flip_mask} if step is flip and flip_mask is not None else {}
            r, c = step.coords(n, h, w, g, xb.device, **kw)
            # the step reads its input at (r, c), which earlier moves read at rows[r], cols[c]
            rows, cols = rows.gather(1, r), cols.gather(1, c)
        xb = gather_pixels(xb, rows, cols)
    x = _to_float(xb, dtype)
    for step in steps[k:]:
        x = step(x, g)
    return x
