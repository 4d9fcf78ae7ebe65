"""Networks of the restoration GAN, from MONAI convolution blocks; its U-Net, patch critic, conditioning
planes and the `UNetArchitecture` are also ASC-Net's, DeScarGAN's and (planes) Progressive GANomaly's.

- generator: a U-Net whose contracting path (`UNetEncoder`, saved as the encoder) and expanding path
  (`UNetDecoder`, saved as the generator) are separate modules joined by skip connections, so it can
  reproduce normal detail while it removes what does not look normal;
- critic: a patch critic (strided convolutions) with a realness logit per patch and an intermediate
  feature map f;
- segmenter: a second U-Net, the discriminative head, that maps (slice, restoration, difference) to a
  per-pixel anomaly logit.

Inputs carry one channel per intensity window, plus the slice position as a constant plane and the
in-plane coordinates as two planes (so networks trained on crops know where a crop lies).
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from ..config import expect
from .base import option

MAX_LEVELS = 7
MAX_WIDTH = 2048  # channels of the deepest level

ACT = (nn.SiLU, {})  # torch.nn.SiLU: one fused op where MONAI's "swish" is three
LEAKY = ("leakyrelu", {"negative_slope": 0.2})


def _conv(in_ch: int, out_ch: int, norm="batch", act=ACT, strides: int = 1, kernel_size: int = 3) -> nn.Module:
    padding = 1 if kernel_size == 4 else None  # stride-2 4x4 halves the size exactly
    return Convolution(2, in_ch, out_ch, strides=strides, kernel_size=kernel_size, act=act, norm=norm, padding=padding)


def _double(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(_conv(in_ch, out_ch), _conv(out_ch, out_ch))


def widths_for(base: int, levels: int) -> List[int]:
    return [base * 2**i for i in range(levels)]


class UNetEncoder(nn.Module):
    """Contracting path: features at full, 1/2, 1/4, ... resolution (average pooling between levels)."""

    def __init__(self, in_ch: int, widths: Sequence[int]):
        super().__init__()
        self.levels = nn.ModuleList()
        for width in widths:
            self.levels.append(_double(in_ch, width))
            in_ch = width

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for i, level in enumerate(self.levels):
            if i:
                x = F.avg_pool2d(x, 2)
            x = level(x)
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """Expanding path: upsample, join the skip of the same resolution, two convolutions; 1x1 output."""

    def __init__(self, widths: Sequence[int], out_ch: int):
        super().__init__()
        self.levels = nn.ModuleList(
            _double(widths[i] + widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.out = nn.Conv2d(widths[0], out_ch, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for level, skip in zip(self.levels, reversed(features[:-1])):
            x = level(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.out(x)


class UNet(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, widths: Sequence[int]):
        super().__init__()
        self.encoder = UNetEncoder(in_ch, widths)
        self.decoder = UNetDecoder(widths, out_ch)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class PatchCritic(nn.Module):
    """Strided 4x4 convolutions to 1/8 resolution; `forward` returns (patch logits, feature map f at 1/4)."""

    def __init__(self, in_ch: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            _conv(in_ch, width, norm=None, act=LEAKY, strides=2, kernel_size=4),
            _conv(width, 2 * width, norm=("instance", {"affine": True}), act=LEAKY, strides=2, kernel_size=4),
        )
        self.head = nn.Sequential(
            _conv(2 * width, 4 * width, norm=("instance", {"affine": True}), act=LEAKY, strides=2, kernel_size=4),
            nn.Conv2d(4 * width, 1, 3, padding=1),
        )

    def forward(self, x):
        f = self.features(x)
        return self.head(f), f


def conditioning(n: int, height: int, width: int, pos: torch.Tensor, top=None, left=None, size=None,
                 with_position: bool = True) -> torch.Tensor:  # fmt: skip
    """(n, 3, height, width): the position plane (2 pos - 1, zero without `with_position`) and the y, x
    coordinates in [-1, 1] of the full `size`-pixel image (crops at `top`, `left`, one per slice; whole
    images when None)."""
    size = size or height
    axis = torch.linspace(-1.0, 1.0, size, device=pos.device)
    if top is None:
        ys = axis[:height].expand(n, -1)
        xs = axis[:width].expand(n, -1)
    else:
        ys = torch.stack([axis[t : t + height] for t in top])
        xs = torch.stack([axis[t : t + width] for t in left])
    plane = (pos.float() * 2 - 1) if with_position else torch.zeros_like(pos, dtype=torch.float32)
    planes = [
        plane.view(n, 1, 1, 1).expand(n, 1, height, width),
        ys.view(n, 1, height, 1).expand(n, 1, height, width),
        xs.view(n, 1, 1, width).expand(n, 1, height, width),
    ]
    return torch.cat(planes, dim=1)


def condition_like(x: torch.Tensor, pos: torch.Tensor, with_position: bool, top=None, left=None, size=None):
    """`conditioning` for the slices or crops x (n, C, h, w), on x's device and in its dtype."""
    n, _, h, w = x.shape
    return conditioning(n, h, w, pos.to(x.device), top, left, size, with_position).to(x.dtype)


def expect_levels_fit(levels: int, image_size: int) -> None:
    fits = 2 <= levels <= MAX_LEVELS and image_size % 2 ** (levels - 1) == 0
    expect(fits, "levels", f"levels such that 2^(levels-1) divides the image size {image_size}", levels)


@dataclass
class UNetArchitecture:
    """A U-Net and a patch critic (ASC-Net, DeScarGAN); the papers' widths are 32 and 64, too slow here."""

    base_width: int = option(8, "channels of the U-Net's first level (doubling at each level)")
    levels: int = option(4, "resolution levels of the U-Net")
    critic_width: int = option(16, "channels of the critic's first convolution")
    condition_on_position: bool = option(True, "do not condition on the slice position", flag="--no-position")

    def validate(self) -> None:
        expect(2 <= self.levels <= MAX_LEVELS, "levels", f"2 to {MAX_LEVELS}", self.levels)
        most = MAX_WIDTH // 2 ** (self.levels - 1)  # widths double at each level
        expect(1 <= self.base_width <= most, "base_width", f"1 to {most} for {self.levels} levels", self.base_width)
        expect(1 <= self.critic_width <= MAX_WIDTH // 4, "critic_width", f"1 to {MAX_WIDTH // 4}", self.critic_width)
