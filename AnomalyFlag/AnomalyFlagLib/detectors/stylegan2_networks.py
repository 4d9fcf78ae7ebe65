"""StyleGAN2-class networks (Karras et al. 2020) for slices.

- mapping network: z (pixel-normalised) and an embedding of the slice position -> style w, with a
  running mean of w (`w_avg`, where the encoder starts);
- synthesis network: a learned constant at the bottleneck, then per resolution two modulated and
  demodulated 3x3 convolutions with per-layer noise and a modulated 1x1 "to image" whose outputs are
  summed across resolutions (skip architecture). One style per modulated layer (`num_ws`), so a code
  can be one w for all layers (W) or one per layer (W+). Noise is random when a torch.Generator is given
  (GAN training) and fixed buffers otherwise, so a slice always gets the same reconstruction;
- critic: residual blocks down to the bottleneck, a minibatch standard-deviation feature and a linear
  head; `feature_map` is the block output at 1/8 resolution (the feature-matching layer f);
- encoder: the DCGAN down trunk into W or W+, as an offset from w_avg.

Layers use equalised learning rates (weights scaled at run time by 1/sqrt(fan-in)).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import expect
from .base import option
from .dcgan_networks import DownTrunk, Shape, position_channel

FEATURE_LEVEL = 3  # f is the critic's map at 1/2^3 of the image size
ENCODER_SPACES = ("w", "w+")


@dataclass
class StyleGAN2Architecture:
    latent_dim: int = option(256, "size of z and of the style w")
    mapping_layers: int = option(4, "layers of the mapping network (StyleGAN2 uses 8)")
    base_width: int = option(8, "channels at the image resolution, doubling at each level down (a GPU: 32)")
    max_width: int = option(64, "largest number of channels of any layer (a GPU: 512)")
    encoder_space: str = option("w+", "the encoder's latent space: w (one style for all layers) or w+ (one per layer)")
    condition_on_position: bool = option(True, "do not condition on the slice position", flag="--no-position")

    def validate(self) -> None:
        expect(2 <= self.latent_dim <= 1024, "latent_dim", "2 to 1024", self.latent_dim)
        expect(1 <= self.mapping_layers <= 16, "mapping_layers", "1 to 16", self.mapping_layers)
        expect(1 <= self.base_width <= self.max_width <= 1024, "base_width and max_width",
               "1 <= base_width <= max_width <= 1024", (self.base_width, self.max_width))  # fmt: skip
        expect(self.encoder_space in ENCODER_SPACES, "encoder_space", "w or w+", self.encoder_space)


def _lrelu(x):
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class EqualLinear(nn.Module):
    def __init__(self, in_features, out_features, bias_init=0.0, lr_mul=1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def forward(self, x):
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return _lrelu(out) if self.activate else out


class EqualConv2d(nn.Module):
    def __init__(self, in_ch, out_ch, kernel_size, bias=True, activate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale, self.activate = 1 / math.sqrt(in_ch * kernel_size**2), activate

    def forward(self, x):
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        return _lrelu(out) if self.activate else out


class ModulatedConv2d(nn.Module):
    """A convolution whose input channels are scaled per sample by a style (an affine map of w) and whose
    output channels are then renormalised to unit expected magnitude (demodulation). Computed by scaling
    the activations rather than the weights (the same result, and one ordinary convolution per batch)."""

    def __init__(self, in_ch, out_ch, kernel_size, w_dim, demodulate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale, self.demodulate = 1 / math.sqrt(in_ch * kernel_size**2), demodulate

    def forward(self, x, w):
        style = self.affine(w)  # (n, in)
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # 1 / sqrt(sum over in, kh, kw of (weight * style)^2), per sample and output channel
            energy = style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()
            out = out * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return out


class StyledLayer(nn.Module):
    """Modulated 3x3 convolution, scaled noise, bias and activation."""

    def __init__(self, in_ch, out_ch, w_dim, size, noise_seed):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        fixed = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(noise_seed))
        self.register_buffer("fixed_noise", fixed)

    def forward(self, x, w, generator=None):
        x = self.conv(x, w)
        if generator is None:
            noise = self.fixed_noise
        else:
            noise = torch.randn((x.shape[0], 1, *x.shape[-2:]), generator=generator).to(x)
        return _lrelu(x + self.noise_strength * noise + self.bias.view(1, -1, 1, 1))


class ToImage(nn.Module):
    def __init__(self, in_ch, out_ch, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class Mapping(nn.Module):
    def __init__(self, arch: StyleGAN2Architecture):
        super().__init__()
        d = arch.latent_dim
        self.condition = arch.condition_on_position
        self.embed = EqualLinear(1, d) if self.condition else None
        layers = [EqualLinear(2 * d if self.condition else d, d, lr_mul=0.01, activate=True)]
        layers += [EqualLinear(d, d, lr_mul=0.01, activate=True) for _ in range(arch.mapping_layers - 1)]
        self.layers = nn.Sequential(*layers)
        self.register_buffer("w_avg", torch.zeros(d))

    def forward(self, z, pos):
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        if self.condition:
            e = self.embed((pos.to(z.dtype) * 2 - 1).view(-1, 1))
            x = torch.cat([x, e * torch.rsqrt(e.pow(2).mean(dim=1, keepdim=True) + 1e-8)], dim=1)
        return self.layers(x)


class Synthesis(nn.Module):
    def __init__(self, arch: StyleGAN2Architecture, shape: Shape):
        super().__init__()
        d, b = arch.latent_dim, shape.bottleneck
        widths = [min(arch.base_width * 2**lv, arch.max_width) for lv in reversed(range(shape.num_levels + 1))]
        self.const = nn.Parameter(torch.randn(1, widths[0], b, b))
        self.first = StyledLayer(widths[0], widths[0], d, b, noise_seed=0)
        self.to_images = nn.ModuleList([ToImage(widths[0], shape.channels, d)])
        self.blocks = nn.ModuleList()
        size = b
        for level in range(1, len(widths)):
            size *= 2
            self.blocks.append(nn.ModuleList([
                StyledLayer(widths[level - 1], widths[level], d, size, noise_seed=2 * level - 1),
                StyledLayer(widths[level], widths[level], d, size, noise_seed=2 * level),
            ]))  # fmt: skip
            self.to_images.append(ToImage(widths[level], shape.channels, d))
        self.num_ws = 1 + 2 * len(self.blocks) + len(self.to_images)

    def forward(self, ws, generator=None):
        """ws (n, num_ws, w_dim) -> image (n, channels, S, S)."""
        x = self.const.repeat(ws.shape[0], 1, 1, 1)  # not a view: a view of a parameter confuses torch's module hooks
        x = self.first(x, ws[:, 0], generator)
        k = 1
        image = self.to_images[0](x, ws[:, k])
        k += 1
        for (a, b), to_image in zip(self.blocks, self.to_images[1:]):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = b(a(x, ws[:, k], generator), ws[:, k + 1], generator)
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = image + to_image(x, ws[:, k + 2])
            k += 3
        return image


class StyleGenerator(nn.Module):
    def __init__(self, arch: StyleGAN2Architecture, shape: Shape):
        super().__init__()
        self.mapping = Mapping(arch)
        self.synthesis = Synthesis(arch, shape)
        self.register_buffer("path_length_mean", torch.zeros(()))  # of the path-length penalty, kept across resumes

    def styles(self, z, pos):
        """(n, num_ws, w_dim): one w, repeated for every layer."""
        return self.mapping(z, pos)[:, None].expand(-1, self.synthesis.num_ws, -1)

    def forward(self, z, pos, generator=None):
        return self.synthesis(self.styles(z, pos), generator)


class ResidualCritic(nn.Module):
    def __init__(self, arch: StyleGAN2Architecture, shape: Shape):
        super().__init__()
        self.condition = arch.condition_on_position
        widths = [min(arch.base_width * 2**lv, arch.max_width) for lv in range(shape.num_levels + 1)]
        self.from_image = EqualConv2d(shape.channels + int(self.condition), widths[0], 1)
        self.blocks = nn.ModuleList()
        for level in range(shape.num_levels):
            self.blocks.append(nn.ModuleList([
                EqualConv2d(widths[level], widths[level], 3),
                EqualConv2d(widths[level], widths[level + 1], 3),
                EqualConv2d(widths[level], widths[level + 1], 1, bias=False, activate=False),
            ]))  # fmt: skip
        self.feature_level = min(FEATURE_LEVEL, shape.num_levels)
        last = widths[-1]
        self.final = EqualConv2d(last + 1, last, 3)
        self.head = nn.Sequential(EqualLinear(last * shape.bottleneck**2, last, activate=True), EqualLinear(last, 1))

    def _trunk(self, x, pos, levels):
        if self.condition:
            x = position_channel(x, pos)
        x = self.from_image(x)
        for conv1, conv2, skip in self.blocks[:levels]:
            main = F.avg_pool2d(conv2(conv1(x)), 2)
            x = (main + skip(F.avg_pool2d(x, 2))) / math.sqrt(2)
        return x

    def feature_map(self, x, pos):
        return self._trunk(x, pos, self.feature_level)

    def features(self, x, pos):
        return self.feature_map(x, pos).flatten(1)

    def forward(self, x, pos):
        x = self._trunk(x, pos, len(self.blocks))
        n = x.shape[0]
        group = next(g for g in (4, 3, 2, 1) if n % g == 0)  # minibatch standard deviation over groups
        std = x.reshape(group, -1, *x.shape[1:]).std(dim=0, unbiased=False).mean(dim=(1, 2, 3)).repeat(group)
        x = torch.cat([x, std.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])], dim=1)
        return self.head(self.final(x).flatten(1)).squeeze(1)


class StyleEncoder(nn.Module):
    """Slice -> styles (n, num_ws, w_dim) as an offset from w_avg: one w (W) or one per layer (W+)."""

    def __init__(self, arch: StyleGAN2Architecture, shape: Shape, num_ws: int):
        super().__init__()
        self.condition = arch.condition_on_position
        self.num_ws, self.w_dim = num_ws, arch.latent_dim
        self.outputs = num_ws if arch.encoder_space == "w+" else 1
        self.trunk = DownTrunk(shape, norm=("batch", {}))
        self.head = nn.Linear(self.trunk.out_features, self.outputs * arch.latent_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x, pos, w_avg):
        if self.condition:
            x = position_channel(x, pos)
        offset = self.head(self.trunk(x).flatten(1)).view(-1, self.outputs, self.w_dim)
        return (w_avg.view(1, 1, -1) + offset).expand(-1, self.num_ws, -1)
