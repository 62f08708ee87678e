"""The `fast` network: airbench94 (KellerJordan/cifar10-airbench); its training side is
the `fast` Recipe (cnn/models.py) and the training loop.

Left out of airbench's recipe: training the whitening bias for the first three epochs
only (freezing it mid-run would change which parameters need gradients, a recompile
under torch.compile) and fp16 weights (bf16 autocast on CUDA, fp32 on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to patch-covariance eigenvalues before 1/sqrt
WHITEN_IMAGES = 5000
OUTPUT_SCALE = 1 / 9
BN_MOMENTUM = 0.4  # PyTorch convention: weight of the new batch in the running statistics


class Conv(nn.Conv2d):
    """Starts as an identity on its first input channels: a free residual path."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class Norm(nn.BatchNorm2d):
    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=BN_MOMENTUM)
        self.weight.requires_grad_(False)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.norm1 = Conv(c_in, c_out), Norm(c_out)
        self.conv2, self.norm2 = Conv(c_out, c_out), Norm(c_out)
        self.pool, self.act = nn.MaxPool2d(2), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"fast model: widths must list 3 block widths, found {len(widths)}: {widths}")
        c_white = 2 * 3 * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(3, c_white, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        c = [c_white, *widths]
        self.blocks = nn.Sequential(*(Block(c[i], c[i + 1]) for i in range(3)))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * OUTPUT_SCALE

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, chunk: int = 500) -> None:
        """Whitening filters: eigenvectors of the patch covariance (uncentred: inputs are zero
        mean), each with its negative so the GELU after them loses nothing. In chunks:
        5000 images hold 4.8M patches (230 MB as float32)."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"init_from_data: expected normalised float images (N, 3, H, W), found "
                             f"{x.dtype} {tuple(x.shape)}")
        k = WHITEN_KERNEL
        d = 3 * k * k
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        count = 0
        for part in x[:WHITEN_IMAGES].split(chunk):
            # in the conv weight's (c, kh, kw) order
            p = part.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
            cov += (p.T @ p).double()
            count += len(p)
        eigval, eigvec = torch.linalg.eigh(cov / count)
        filters = (eigvec.T / torch.sqrt(eigval + WHITEN_EPS)[:, None]).flip(0)  # largest first
        filters = filters.view(d, 3, k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))


class Lookahead:
    """airbench's lookahead: every `every` steps after the first `start` of training, the
    weights move to an exponential average of themselves and train on from it. The decay
    rises as (step / total) ** `power`: fast moves early, strong averaging at the end."""

    every, base, power, start = 5, 0.95, 3.0, 0.3

    def __init__(self, model: nn.Module, total_steps: int):
        self.model, self.total = model, total_steps
        self.average: dict[str, torch.Tensor] | None = None

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
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
        if self.average is not None:
            for name, value in self._floats().items():
                value.copy_(self.average[name])
