"""DCGAN networks built from MONAI convolution blocks, shared by f-AnoGAN and GANomaly: generator
G(z, pos), critic D(x, pos) with an intermediate feature layer f(x), and encoder E(x, pos) -> z.

Images have one channel per intensity window. The relative slice position pos in [0, 1] enters G as an
extra latent coordinate and D/E as an extra constant input channel; with conditioning switched off it is
ignored.
"""

from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn

from ..config import expect
from .base import option

MAX_WIDTH = 1024
MAX_LATENT = 1024


@dataclass
class DCGANArchitecture:
    """Sizes of the DCGAN networks (the image size and channels come from the preprocessing)."""

    latent_dim: int = option(128, "size of the latent space")
    base_width: int = option(16, "channels of the first critic/encoder convolution")
    max_width: int = option(128, "largest number of channels of any layer")
    condition_on_position: bool = option(True, "do not condition on the slice position", flag="--no-position")

    def validate(self) -> None:
        expect(2 <= self.latent_dim <= MAX_LATENT, "latent_dim", f"2 to {MAX_LATENT}", self.latent_dim)
        expect(1 <= self.base_width <= MAX_WIDTH, "base_width", f"1 to {MAX_WIDTH}", self.base_width)
        expect(self.base_width <= self.max_width <= MAX_WIDTH, "max_width",
               f"base_width ({self.base_width}) to {MAX_WIDTH}", self.max_width)  # fmt: skip


@dataclass
class Shape:
    """An architecture bound to an image size and channel count."""

    arch: DCGANArchitecture
    image_size: int
    channels: int

    @property
    def num_levels(self) -> int:
        """Stride-2 stages between image_size and the bottleneck (4x4 to 7x7: 4x4 for powers of two)."""
        levels = 0
        while self.image_size % 2 ** (levels + 1) == 0 and self.image_size // 2 ** (levels + 1) >= 4:
            levels += 1
        return levels

    @property
    def bottleneck(self) -> int:
        return self.image_size // 2**self.num_levels

    def widths(self):
        """Channel width at each level, from full resolution down to 4x4."""
        a = self.arch
        return [min(a.base_width * 2**level, a.max_width) for level in range(self.num_levels)]


LEAKY = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})


def position_channel(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    plane = (pos.to(x.dtype) * 2 - 1).view(-1, 1, 1, 1).expand(-1, 1, x.shape[2], x.shape[3])
    return torch.cat([x, plane], dim=1)


class DownTrunk(nn.Module):
    """Stride-2 4x4 convolutions from image_size down to 4x4 (shared shape of critic and encoder)."""

    def __init__(self, config: Shape, norm):
        super().__init__()
        in_ch = config.channels + int(config.arch.condition_on_position)
        layers = []
        for level, width in enumerate(config.widths()):
            layers.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=width,
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    act=LEAKY,
                    norm=None if level == 0 else norm,
                    bias=level == 0 or norm is None,
                )
            )
            in_ch = width
        self.layers = nn.Sequential(*layers)
        self.out_features = in_ch * config.bottleneck**2

    def forward(self, x):
        return self.layers(x)


class Critic(nn.Module):
    """WGAN critic; `features` is the last convolutional map, used for feature matching."""

    def __init__(self, config: Shape):
        super().__init__()
        self.condition = config.arch.condition_on_position
        # No batch statistics in the critic: the gradient penalty is computed per sample.
        self.trunk = DownTrunk(config, norm=("instance", {"affine": True}))
        self.head = nn.Linear(self.trunk.out_features, 1)

    def feature_map(self, x, pos):
        """The last convolutional map (n, C, b, b) at the bottleneck: the feature layer f."""
        if self.condition:
            x = position_channel(x, pos)
        return self.trunk(x)

    def features(self, x, pos):
        return self.feature_map(x, pos).flatten(1)

    def forward(self, x, pos):
        return self.head(self.features(x, pos)).squeeze(1)


class Encoder(nn.Module):
    """Maps a slice to the generator's latent space (`bounded`: by tanh, like f-AnoGAN's uniform prior)."""

    def __init__(self, config: Shape, bounded: bool = True):
        super().__init__()
        self.condition = config.arch.condition_on_position
        self.bounded = bounded
        self.trunk = DownTrunk(config, norm=("batch", {}))
        self.head = nn.Linear(self.trunk.out_features, config.arch.latent_dim)

    def forward(self, x, pos):
        if self.condition:
            x = position_channel(x, pos)
        z = self.head(self.trunk(x).flatten(1))
        return torch.tanh(z) if self.bounded else z


class Generator(nn.Module):
    """Transposed-convolution generator from (z, pos) to a slice in [-1, 1]."""

    def __init__(self, config: Shape):
        super().__init__()
        self.condition = config.arch.condition_on_position
        widths = config.widths()
        self.bottleneck_width = widths[-1]
        self.bottleneck = config.bottleneck
        self.project = nn.Sequential(
            nn.Linear(config.arch.latent_dim + int(self.condition), widths[-1] * config.bottleneck**2),
        )
        self.project_norm = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        layers = []
        outs = list(reversed(widths[:-1])) + [config.channels]
        in_ch = widths[-1]
        for i, out_ch in enumerate(outs):
            last = i == len(outs) - 1
            layers.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    output_padding=0,
                    is_transposed=True,
                    act="tanh" if last else "relu",
                    norm=None if last else "batch",
                    bias=last,
                )
            )
            in_ch = out_ch
        self.layers = nn.Sequential(*layers)

    def forward(self, z, pos):
        if self.condition:
            z = torch.cat([z, (pos.to(z.dtype) * 2 - 1).view(-1, 1)], dim=1)
        x = self.project(z).view(-1, self.bottleneck_width, self.bottleneck, self.bottleneck)
        return self.layers(self.project_norm(x))


def validate_size(backend: str, image_size: int) -> None:
    if image_size < 64 or image_size % 16:
        raise ValueError(f"{backend} needs an image size that is a multiple of 16 from 64 to 512, not {image_size}")
