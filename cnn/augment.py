"""Batched, on-device augmentation: a variant is a list of steps over whole batches.

Every step maps a batch (B, 3, H, W) to one of the same shape on the same device,
drawing its randomness from the generator it is given, so a seeded run is
repeatable. No PIL, no per-image Python loop, no DataLoader workers (the
airbench way). Two kinds of step:

- moves (`flip`, `translate`) only change where each output pixel is read from.
  A move draws, per image, the source row of every output row (B, H) and the
  source column of every output column (B, W). Moves work on any dtype and
  commute with normalisation, so `make_batch` composes a variant's leading moves
  into one index map and applies it with a single gather on the uint8 batch
  (a quarter of the bytes of float32, and one pass instead of one per step).
- paints (`cutout`, `jitter`) change values of the normalised float batch.

`make_batch` is what training uses: uint8 dataset + indices -> augmented,
normalised float batch. `augment` applies a variant to an already normalised
batch, step by step (the plain definition; tests compare the two).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# CIFAR-10 training-set channel statistics, on the 0..1 scale
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

Step = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Coords = tuple[torch.Tensor, torch.Tensor]  # rows (B, H), cols (B, W): int64 source indices


def _to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float in x's layout: x * (1/std) - mean/std.

    A multiply and an add in place over a (1, 3, 1, 1) broadcast: fast on an NCHW
    batch (the broadcast is not over the innermost dimension)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize: expected a uint8 image batch, found {x.dtype}")
    scale = torch.tensor([1 / (255 * s) for s in STD], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return x.to(dtype).mul_(scale).add_(shift)


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float, channels_last (what the models take)."""
    return _to_float(x, dtype).contiguous(memory_format=torch.channels_last)


def _uniform(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device).to(device)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n-1), 2n-2] reflected into [0, n), like F.pad(mode="reflect")."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] for any dtype, in one gather.

    Returns an NCHW-contiguous tensor of x's shape and dtype."""
    n, c, h, w = x.shape
    lin = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w)  # (B, 1, H*W) flat source index
    return x.reshape(n, c, h * w).gather(2, lin.expand(n, c, h * w)).view(n, c, h, w)


@dataclass(frozen=True)
class Move:
    """A step that only moves pixels; `coords(n, h, w, g, device, **kw)` draws its
    per-image source rows (B, H) and columns (B, W). Calling it moves a batch."""

    name: str
    coords: Callable[..., Coords]

    def __call__(self, x: torch.Tensor, g: torch.Generator | None, **kw) -> torch.Tensor:
        rows, cols = self.coords(len(x), x.shape[-2], x.shape[-1], g, x.device, **kw)
        return gather_pixels(x, rows, cols)


def _flip_coords(n, h, w, g, device, mask: torch.Tensor | None = None) -> Coords:
    """Mirror each image left-right with probability 1/2; `mask` (B,) bool overrides the draw."""
    if mask is None:
        mask = _uniform(n, g, device) < 0.5
    j = torch.arange(w, device=device)
    cols = torch.where(mask.view(n, 1), w - 1 - j, j)  # (B, W)
    return torch.arange(h, device=device).expand(n, h), cols


def _translate_coords(n, h, w, g, device, pad: int = 4, offsets: torch.Tensor | None = None) -> Coords:
    """Pad-and-crop: output pixel (i, j) reads input (i + dy, j + dx), reflected at the border,
    with (dy, dx) uniform in [-pad, pad]; `offsets` (B, 2) int overrides the draw."""
    if not 0 <= pad < min(h, w):
        raise ValueError(f"translate: pad must be in [0, {min(h, w) - 1}] for {h}x{w} images, found {pad}")
    if offsets is None:
        offsets = (_uniform(2 * n, g, device).view(n, 2) * (2 * pad + 1)).long() - pad
    offsets = offsets.to(device=device, dtype=torch.long)
    rows = _reflect(torch.arange(h, device=device) + offsets[:, :1], h)  # (B, H)
    cols = _reflect(torch.arange(w, device=device) + offsets[:, 1:], w)  # (B, W)
    return rows, cols


flip = Move("flip", _flip_coords)
translate = Move("translate", _translate_coords)


def cutout(x: torch.Tensor, g: torch.Generator, size: int = 8, centers: torch.Tensor | None = None) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) centred at a random pixel.

    Zero is the mean after normalisation. `centers` (B, 2) int overrides the draw."""
    n, _, h, w = x.shape
    if centers is None:
        centers = (_uniform(2 * n, g, x.device).view(n, 2) * torch.tensor([h, w], device=x.device)).long()
    lo = centers.to(x.device).long() - size // 2  # (B, 2) top-left corner, may be off the image
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    in_rows = ((ys >= lo[:, :1]) & (ys < lo[:, :1] + size)).to(x.dtype)  # (B, H) 1 inside
    in_cols = ((xs >= lo[:, 1:]) & (xs < lo[:, 1:] + size)).to(x.dtype)  # (B, W)
    # a multiply by a (B, 1, H, W) 0/1 mask: ten times faster than masked_fill's broadcast
    keep = 1 - in_rows[:, None, :, None] * in_cols[:, None, None, :]
    return x * keep


def jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.3, contrast: float = 0.3,
           saturation: float = 0.3) -> torch.Tensor:
    """Colour jitter per image, in this order: brightness shift, contrast and saturation scale.

    With u ~ U[-1, 1) per image and factor: beta = u0 * brightness / 0.25 (a shift of
    `brightness` on the 0..1 scale is ~1/0.25 std units), c = 1 + u1 * contrast,
    s = 1 + u2 * saturation:
        x1 = x + beta;  x2 = (x1 - mean(x1)) * c + mean(x1);  x3 = (x2 - grey(x2)) * s + grey(x2)
    where mean is over the whole image and grey over channels. All three are affine
    in the pixel's colour, so x3 = A x + t with A = c (s I + (1 - s) J / C) and
    t = beta + (1 - c) mean(x): one batched (C x C) matrix product per image."""
    n, ch, h, w = x.shape
    u = _uniform(3 * n, g, x.device).view(3, n) * 2 - 1  # in [-1, 1)
    beta, c, s = u[0] * brightness / 0.25, 1 + u[1] * contrast, 1 + u[2] * saturation  # (B,) each
    eye = torch.eye(ch, device=x.device, dtype=x.dtype)
    avg = torch.full((ch, ch), 1 / ch, device=x.device, dtype=x.dtype)
    a = c.view(n, 1, 1) * (s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * avg)  # (B, C, C)
    t = beta + (1 - c) * x.mean(dim=(1, 2, 3))  # (B,)
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
    """The one refusal of a list of variant names: empty, or naming one that is not in VARIANTS."""
    if not names:
        raise ValueError(f"at least one variant is needed; known variants: {', '.join(VARIANTS)}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; known variants: {', '.join(VARIANTS)}")


def _steps(variant: str) -> list[Step]:
    check_variants([variant])
    return VARIANTS[variant]


def augment(x: torch.Tensor, variant: str, g: torch.Generator) -> torch.Tensor:
    """Apply the variant's steps in order to a normalised float batch."""
    for step in _steps(variant):
        x = step(x, g)
    return x


def make_batch(x_u8: torch.Tensor, idx: torch.Tensor, variant: str, g: torch.Generator,
               flip_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The training batch: images `idx` of the uint8 dataset (N, 3, H, W), augmented by
    `variant`, normalised, float (B, 3, H, W).

    The variant's leading moves run as one gather on uint8; the rest on the float
    batch. `flip_mask` (B,) bool replaces `flip`'s coin (the alternating flip).
    The batch stays NCHW: a model with channels_last weights reorders it in its first
    convolution at no measurable cost, while a separate copy here would be a third of
    the pipeline's time."""
    steps = _steps(variant)
    xb = x_u8.index_select(0, idx)  # (B, 3, H, W) uint8: a row copy per image
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
