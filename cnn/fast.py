"""The `fast` network: the airbench94 recipe (KellerJordan/cifar10-airbench), in this
project's structure.

    whiten  2x2 conv, 3 -> 24 channels, frozen, set from training-patch statistics; GELU
    block   conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
            x3, widths 64, 256, 256 (31x31 -> 15 -> 7 -> 3)
    head    max-pool 3 -> linear 256 -> 10 (no bias) -> x 1/9

Convolutions start as identities (dirac) on their first input channels, a free
residual path; BatchNorm has a fixed scale of 1 and a learned bias only. The
training side of the recipe (label smoothing, Nesterov SGD with a 64x learning
rate on BatchNorm biases, warm-up then linear decay, lookahead, alternating
flip, flip-and-translate test-time augmentation) lives in the model's `Recipe`
(cnn/models.py) and the training loop; `Lookahead` is here because only this
recipe uses it.

Left out of airbench's recipe: training the whitening bias for the first three
epochs only (here it trains throughout; freezing it mid-run would change which
parameters need gradients, a recompile under torch.compile) and fp16 weights
(we use bf16 autocast on CUDA, fp32 on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to patch-covariance eigenvalues before 1/sqrt
WHITEN_IMAGES = 5000  # training images whose patches set the whitening layer
OUTPUT_SCALE = 1 / 9
BN_MOMENTUM = 0.4  # PyTorch convention: weight of the new batch in the running statistics


class Conv(nn.Conv2d):
    """3x3 'same' convolution without bias, starting as an identity on its first input channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])  # output channel k copies input channel k, for k < c_in


class Norm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (not learned) and a learned bias."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=BN_MOMENTUM)
        self.weight.requires_grad_(False)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.norm1 = Conv(c_in, c_out), Norm(c_out)
        self.conv2, self.norm2 = Conv(c_out, c_out), Norm(c_out)
        self.pool, self.act = nn.MaxPool2d(2), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H//2, W//2)
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"fast model: widths must list 3 block widths, found {len(widths)}: {widths}")
        c_white = 2 * 3 * WHITEN_KERNEL**2  # each whitening direction and its negative: 24
        self.whiten = nn.Conv2d(3, c_white, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_from_data, never trained
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        c = [c_white, *widths]
        self.blocks = nn.Sequential(*(Block(c[i], c[i + 1]) for i in range(3)))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) normalised -> (B, classes)
        x = self.blocks(self.act(self.whiten(x)))  # (B, 256, 3, 3)
        return self.head(self.pool(x).flatten(1)) * OUTPUT_SCALE

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, chunk: int = 500) -> None:
        """Set the whitening filters from normalised training images x (N, 3, 32, 32).

        The filters are the eigenvectors of the (uncentred: inputs are already zero
        mean) 2x2-patch covariance, scaled by 1/sqrt(eigenvalue + eps), each with its
        negative so the GELU after them loses nothing. Patches are counted in chunks
        of `chunk` images: 5000 images hold 4.8M patches (230 MB as float32)."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"init_from_data: expected normalised float images (N, 3, H, W), found "
                             f"{x.dtype} {tuple(x.shape)}")
        k = WHITEN_KERNEL
        d = 3 * k * k  # 12 values per patch
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        count = 0
        for part in x[:WHITEN_IMAGES].split(chunk):
            # (n, 3, H-1, W-1, k, k) -> (n * (H-1) * (W-1), 12) in the conv weight's (c, kh, kw) order
            p = part.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
            cov += (p.T @ p).double()
            count += len(p)
        eigval, eigvec = torch.linalg.eigh(cov / count)  # ascending eigenvalues
        filters = (eigvec.T / torch.sqrt(eigval + WHITEN_EPS)[:, None]).flip(0)  # (12, 12), largest first
        filters = filters.view(d, 3, k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))


class Lookahead:
    """airbench's lookahead: every `every` steps after the first `start` fraction of
    training, the weights move to an exponential average of themselves, and the
    average is copied back into the model (so the model trains from the average).

    The decay rises from 0 to `base ** every` as (step / total) ** `power`: the
    model moves fast early and is averaged strongly at the end. All floating-point
    state (weights and BatchNorm running statistics) takes part."""

    every, base, power, start = 5, 0.95, 3.0, 0.3

    def __init__(self, model: nn.Module, total_steps: int, state: dict | None = None):
        self.model, self.total = model, total_steps
        self.average = state  # name -> tensor, or None until the first update

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if step < self.start * self.total or step % self.every:
            return
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in self._floats().items()}
            return
        decay = self.base**self.every * (step / self.total) ** self.power
        for name, value in self._floats().items():
            avg = self.average[name]
            avg.lerp_(value, 1 - decay)
            value.copy_(avg)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the average into the model (at the end of every epoch)."""
        if self.average is not None:
            for name, value in self._floats().items():
                value.copy_(self.average[name])

    def state_dict(self) -> dict | None:
        return None if self.average is None else {k: v.detach().cpu().clone() for k, v in self.average.items()}
