"""Batched augmentation: every step matches its definition on small tensors, and the
fused training path (make_batch) matches the step-by-step one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnn import augment as A

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n=16, seed=0, device="cpu") -> torch.Tensor:
    """Distinct random uint8 images (n, 3, 32, 32), never 0 (so zeroed pixels stand out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)


def gen(seed=0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def shifted(img: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """The definition of translate for one image (C, H, W): reflect-pad, crop at (pad+dy, pad+dx)."""
    h, w = img.shape[-2:]
    padded = F.pad(img[None].float(), (pad,) * 4, mode="reflect")[0]
    return padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(A.VARIANTS))
def test_shapes_dtypes_devices_preserved(variant, device):
    x = images(8, device=device)
    idx = torch.tensor([5, 1, 7, 0], device=device)
    out = A.make_batch(x, idx, variant, gen(device=device))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == device
    assert out.is_contiguous()  # NCHW: the model's channels_last first convolution reorders it
    xn = A.normalize(x)
    step_by_step = A.augment(xn, variant, gen(device=device))
    assert step_by_step.shape == xn.shape and step_by_step.dtype == xn.dtype and step_by_step.device == xn.device


def test_none_is_identity():
    x = images(8)
    idx = torch.tensor([3, 3, 6, 1])
    assert torch.equal(A.make_batch(x, idx, "none", gen()), A.normalize(x[idx]))
    xn = A.normalize(x)
    assert torch.equal(A.augment(xn, "none", gen()), xn)


def test_normalize_uses_the_channel_statistics():
    x = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = A.normalize(x)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor((128 / 255 - A.MEAN[c]) / A.STD[c]), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        A.normalize(out)


def test_flip_is_a_flip():
    x = images(6)
    mask = torch.tensor([True, False, True, True, False, False])
    out = A.flip(x, None, mask=mask)
    for k in range(6):
        assert torch.equal(out[k], x[k].flip(-1) if mask[k] else x[k])
    # drawn coins: every image is itself or its mirror, and both happen
    out = A.flip(images(64), gen())
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images(64))]
    same = [torch.equal(o, i) for o, i in zip(out, images(64))]
    assert all(m or s for m, s in zip(mirrored, same)) and 0 < sum(mirrored) < 64


def test_translate_moves_by_the_offsets():
    x = images(5)
    offsets = torch.tensor([[0, 0], [4, -4], [-4, 4], [1, -3], [-2, 2]])
    out = A.translate(x, None, pad=4, offsets=offsets)
    for k, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[k].float(), shifted(x[k], dy, dx, 4)), (dy, dx)
    # the output pixel (i, j) reads the input at (i + dy, j + dx): content moves by (-dy, -dx)
    assert torch.equal(out[3, :, 5, 10], x[3, :, 6, 7])


def test_translate_draws_offsets_in_range():
    x = images(32)
    out = A.translate(x, gen(), pad=2)
    found = []
    for k in range(32):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(out[k].float(), shifted(x[k], dy, dx, 2))]
        assert len(hits) == 1, f"image {k}: not a shift by one offset in [-2, 2]^2"
        found.append(hits[0])
    assert len(set(found)) > 5  # offsets vary across the batch
    with pytest.raises(ValueError, match="pad"):
        A.translate(x, gen(), pad=32)


def test_cutout_zeroes_the_square():
    x = A.normalize(images(3)) + 10.0  # no zeros anywhere
    centers = torch.tensor([[16, 16], [0, 0], [31, 5]])
    out = A.cutout(x, None, size=8, centers=centers)
    for k, (cy, cx) in enumerate(centers.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[max(0, cy - 4) : cy + 4, max(0, cx - 4) : cx + 4] = True  # clipped at the border
        assert (out[k][:, inside] == 0).all()
        assert torch.equal(out[k][:, ~inside], x[k][:, ~inside])
    # drawn centres: each image loses one square of at most 8x8 pixels, in all channels alike
    out = A.cutout(A.normalize(images(16)) + 10.0, gen())
    zero = (out == 0).all(1)  # (B, H, W)
    assert ((out == 0).any(1) == zero).all()
    for z in zero:
        rows, cols = z.any(1).nonzero(), z.any(0).nonzero()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8
        assert z.sum() == len(rows) * len(cols)  # a filled rectangle


def test_jitter_matches_its_definition():
    x = A.normalize(images(8))
    out = A.jitter(x, gen(3))
    # the definition, step by step, with the same draws
    u = torch.rand(24, generator=gen(3)).view(3, 8, 1, 1, 1) * 2 - 1
    ref = x + u[0] * 0.3 / 0.25
    mean = ref.mean(dim=(1, 2, 3), keepdim=True)
    ref = (ref - mean) * (1 + u[1] * 0.3) + mean
    grey = ref.mean(dim=1, keepdim=True)
    ref = (ref - grey) * (1 + u[2] * 0.3) + grey
    assert torch.allclose(out, ref, atol=1e-4)
    assert not torch.allclose(out, x, atol=1e-2)


@pytest.mark.parametrize("variant", list(A.VARIANTS))
def test_make_batch_matches_step_by_step(variant):
    """The fused path (moves as one uint8 gather, then normalise) is the plain definition."""
    x = images(16)
    idx = torch.randperm(16, generator=gen(1))[:12]
    fused = A.make_batch(x, idx, variant, gen(7))
    plain = A.augment(A.normalize(x[idx]), variant, gen(7))
    assert torch.allclose(fused, plain, atol=1e-5)


def test_make_batch_flip_mask_replaces_the_coin():
    x = images(4)
    idx = torch.arange(4)
    mask = torch.tensor([True, True, False, False])
    out = A.make_batch(x, idx, "flip", gen(), flip_mask=mask)
    assert torch.equal(out, A.normalize(torch.stack([x[0].flip(-1), x[1].flip(-1), x[2], x[3]])))


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown variant.*'blur'.*known variants: none, flip"):
        A.make_batch(images(2), torch.arange(2), "blur", gen())
    with pytest.raises(ValueError, match="known variants"):
        A.check_variants(["flip", "blur"])
