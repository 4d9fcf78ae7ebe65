"""Generic synthetic corruptions of normal slices, for restoration and discriminative training.

Each slice of a batch gets at most one of these families (or none), inside the body only:

- coarse noise: Gaussian noise drawn on a coarse grid (cells of 4 to 16 pixels at 64 px, scaled with
  the crop), bilinearly upsampled: the denoising-autoencoder corruption of Kascenas et al. (2022);
- intensity blobs: an irregular region (a thresholded smooth random field, 0.2% to 5% of the crop) whose
  intensities shift by a random amount of either sign (log-uniform from 0.1 to 10 intensity units, with
  texture);
- thin bands: the narrow level set of a smooth random field inside one random region (curvilinear
  structures of any orientation), shifted like the blobs;
- foreign patches: an irregular region blended in from another normal slice of the batch, shifted.

None of them reproduces an evaluation anomaly (`phantom.insert_anomaly` draws ellipsoids, metal
cylinders with streaks and fluid crescents along the body wall): shapes are random fields, intensities
random shifts. The label of a pixel is whether the corruption changed it by more than `label_change`
intensity units (after a 3x3 mean), so an invisible corruption is not a positive.
"""

import math
from typing import Tuple

import torch
import torch.nn.functional as F

FAMILIES = ("none", "coarse_noise", "intensity_blobs", "thin_bands", "foreign_patches")
OTHER_FAMILY_SHARES = (0.24, 0.41, 0.17)
"""Coarse noise, intensity blobs and foreign patches, relative to each other."""
MAX_BLOB_COVERAGE = 0.05


def corruption_mix(clean_share: float, band_share: float) -> Tuple[float, ...]:
    """Probabilities of FAMILIES: `clean_share` of crops untouched; of the others, `band_share` get thin
    bands and the rest the other families in the proportions OTHER_FAMILY_SHARES."""
    rest = [(1 - band_share) * v / sum(OTHER_FAMILY_SHARES) for v in OTHER_FAMILY_SHARES]
    shares = (rest[0], rest[1], band_share, rest[2])
    return (clean_share,) + tuple((1 - clean_share) * v for v in shares)


def _field(n: int, size: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    f = torch.randn(n, 1, max(2, grid), max(2, grid), generator=gen)
    return F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _blobs(coverage: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Soft masks (n, 1, size, size) of irregular regions covering about `coverage` of the crop."""
    out = []
    for cov in coverage.tolist():
        f = _field(1, size, int(torch.randint(3, 9, (1,), generator=gen)) * size // 64, gen).flatten()
        level = torch.kthvalue(f, max(1, int(round(f.numel() * (1 - cov))))).values
        out.append(((f - level) * 6).clamp(0, 1).view(1, size, size))
    return torch.stack(out)


def _bands(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        f = _field(1, size, int(torch.randint(2, 6, (1,), generator=gen)) * size // 64, gen)
        f = (f - f.mean()) / (f.std() + 1e-6)
        level = float(_uniform(1, -1.0, 1.0, gen))
        width = float(_uniform(1, 0.05, 0.25, gen))
        band = ((1 - (f - level).abs() / width) * 3).clamp(0, 1)
        out.append((band * _blobs(_uniform(1, 0.05, 0.2, gen), size, gen))[0])
    return torch.stack(out)


def corrupt(
    x: torch.Tensor,
    body: torch.Tensor,
    unit: float,
    gen: torch.Generator,
    mix: Tuple[float, ...] = (0.15, 0.2, 0.35, 0.15, 0.15),
    label_change: float = 0.075,
    floor: float = float("-inf"),
    min_coverage: float = 0.002,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Corrupt raw-intensity slices x (n, 1, S, S) inside `body` (n, 1, S, S).

    `unit` is the intensity unit (half the first window's width: 200 HU for the default CT windows);
    `mix` the probabilities of FAMILIES; nothing goes below `floor` (air); intensity blobs cover
    `min_coverage` to MAX_BLOB_COVERAGE of the crop (log-uniform). Returns the corrupted slices and the
    per-pixel label (bool)."""
    n, _, size, _ = x.shape
    if len(mix) != len(FAMILIES):
        raise ValueError(f"mix needs {len(FAMILIES)} probabilities ({', '.join(FAMILIES)})")
    family = torch.searchsorted(torch.tensor(mix).cumsum(0), torch.rand(n, generator=gen), right=True)
    family = family.clamp(max=len(FAMILIES) - 1)
    inside = body.float()
    out = x.clone()

    for i in torch.nonzero(family == 1).flatten().tolist():
        grid = (4, 8, 16)[int(torch.randint(0, 3, (1,), generator=gen))] * size // 64
        sigma = float(_uniform(1, 0.1, 0.75, gen)) * unit
        out[i] += sigma * _field(1, size, grid, gen)[0] * inside[i]

    def shift(idx: torch.Tensor, region: torch.Tensor) -> None:
        magnitude = torch.exp(_uniform(len(idx), math.log(0.1), math.log(10.0), gen)) * unit
        sign = torch.where(torch.rand(len(idx), generator=gen) < 0.5, -1.0, 1.0)
        texture = 1 + 0.3 * _field(len(idx), size, size // 8, gen)
        out[idx] += region * (magnitude * sign).view(-1, 1, 1, 1) * texture

    idx = torch.nonzero(family == 2).flatten()
    if len(idx):
        coverage = torch.exp(_uniform(len(idx), math.log(min_coverage), math.log(MAX_BLOB_COVERAGE), gen))
        shift(idx, _blobs(coverage, size, gen) * inside[idx])
    idx = torch.nonzero(family == 3).flatten()
    if len(idx):
        shift(idx, _bands(len(idx), size, gen) * inside[idx])
    idx = torch.nonzero(family == 4).flatten()
    if len(idx):
        region = _blobs(_uniform(len(idx), 0.01, 0.08, gen), size, gen) * inside[idx]
        sources = torch.randint(0, n, (len(idx),), generator=gen).tolist()
        offsets = torch.randint(-size // 4, size // 4 + 1, (len(idx), 2), generator=gen).tolist()
        other = torch.stack([torch.roll(x[s], (dy, dx), (1, 2)) for s, (dy, dx) in zip(sources, offsets)])
        alpha = _uniform(len(idx), 0.5, 1.0, gen).view(-1, 1, 1, 1) * region
        out[idx] = out[idx] * (1 - alpha) + other * alpha

    out = out.clamp_min(floor)
    label = F.avg_pool2d((out - x).abs(), 3, 1, 1) > label_change * unit
    return out, label
