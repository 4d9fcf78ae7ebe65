"""Networks of Progressive GANomaly: patch encoders, decoder and critic that grow in resolution.

Each network holds one block per resolution from the patch size down to 4x4 and, per resolution, a
1x1 "from image" (encoders, critic) or "to image" (decoder) layer. At resolution r only the blocks
below r run; while a new resolution fades in, its output is blended with the previous resolution's path
(progressive growing, Karras et al. 2018). Patches carry the window channels plus the slice position
and their y, x coordinates in the slice (see `restoration_networks.conditioning`).
"""

from typing import List

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

LEAKY = ("leakyrelu", {"negative_slope": 0.2})


def resolutions(start: int, end: int) -> List[int]:
    """start, 2 start, ..., end."""
    sizes = [start]
    while sizes[-1] < end:
        sizes.append(sizes[-1] * 2)
    return sizes


def _conv(in_ch, out_ch, strides=1, kernel_size=3, norm="batch", act=LEAKY):
    padding = 1 if kernel_size == 4 else None  # stride-2 4x4 halves the size exactly
    return Convolution(2, in_ch, out_ch, strides=strides, kernel_size=kernel_size, act=act, norm=norm, padding=padding)


class _Grown(nn.Module):
    """Resolution bookkeeping shared by the growing networks: blocks at every resolution from 4x4 to the
    patch size, image layers at the trained ones (`start` to the patch size), widths halving as the
    resolution doubles (`max_width` at 4x4, at least `base_width`)."""

    def __init__(self, start: int, patch_size: int, base_width: int, max_width: int):
        super().__init__()
        self.sizes = resolutions(4, patch_size)
        self.trained = resolutions(start, patch_size)
        self.width = {s: max(base_width, max_width * 4 // s) for s in self.sizes}


class PatchEncoder(_Grown):
    """(n, C, r, r) patch at resolution r -> (n, latent) code; with `head` 1 it is the critic, whose
    `features` (the 4x4 map) give the feature-matching term."""

    def __init__(self, in_ch: int, start: int, patch_size: int, base_width: int, max_width: int, latent: int):
        super().__init__(start, patch_size, base_width, max_width)
        self.from_image = nn.ModuleDict(
            {str(s): _conv(in_ch, self.width[s], kernel_size=1, norm=None) for s in self.trained}
        )
        self.down = nn.ModuleDict(
            {str(s): _conv(self.width[s], self.width[s // 2], strides=2, kernel_size=4)
             for s in self.sizes[1:]}
        )  # fmt: skip
        self.head = nn.Conv2d(self.width[4], latent, 4)

    def features(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        size = x.shape[-1]
        h = self.from_image[str(size)](x)
        if size > 4:
            h = self.down[str(size)](h)
            if alpha < 1.0 and str(size // 2) in self.from_image:
                h = alpha * h + (1 - alpha) * self.from_image[str(size // 2)](F.avg_pool2d(x, 2))
            size //= 2
        while size > 4:
            h = self.down[str(size)](h)
            size //= 2
        return h

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self.head(self.features(x, alpha)).flatten(1)


class PatchDecoder(_Grown):
    """(n, latent) code and the patch's conditioning planes -> (n, C, r, r) patch in [-1, 1]."""

    def __init__(self, out_ch: int, cond_ch: int, start: int, patch_size: int, base_width: int, max_width: int,
                 latent: int):  # fmt: skip
        super().__init__(start, patch_size, base_width, max_width)
        self.project = nn.Sequential(
            nn.ConvTranspose2d(latent, self.width[4], 4), nn.BatchNorm2d(self.width[4]), nn.ReLU()
        )
        self.up = nn.ModuleDict(
            {str(s): _conv(self.width[s // 2] + cond_ch, self.width[s], norm="batch", act="relu")
             for s in self.sizes[1:]}
        )  # fmt: skip
        self.to_image = nn.ModuleDict({str(s): nn.Conv2d(self.width[s], out_ch, 1) for s in self.trained})

    def forward(self, z: torch.Tensor, cond: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """`cond` (n, k, r, r) at the output resolution r."""
        target = cond.shape[-1]
        h = self.project(z[:, :, None, None])
        size, previous = 4, None
        while size < target:
            previous = h
            size *= 2
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = self.up[str(size)](torch.cat([h, F.adaptive_avg_pool2d(cond, size)], dim=1))
        out = self.to_image[str(size)](h)
        if alpha < 1.0 and str(size // 2) in self.to_image:
            coarse = self.to_image[str(size // 2)](previous)
            out = alpha * out + (1 - alpha) * F.interpolate(coarse, scale_factor=2, mode="nearest")
        return torch.tanh(out)
