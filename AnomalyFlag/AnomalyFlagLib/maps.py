"""From a backend's raw pixel maps to one normalised anomaly map and a localised slice score.

Every component map is normalised per pixel by statistics of held-out NORMAL slices, in bins of slice
position: z = (m - mean) / max(std, floor), with mean and std smoothed in-plane and the floor a share of
the component's overall spread, so that pixels where normal anatomy varies (bowel gas, the spine, the
lung bases) cannot dominate and a pixel that never varies cannot blow up. The anomaly map is the
weighted sum of max(z, 0) over the components, smoothed; the slice score is the mean of its top
`score_area_mm2` inside the body. The heatmap shows exactly this map, so what is flagged is what is shown.

A whole-slice component (a global reconstruction: high over the whole slice, not at one place) is kept
out of the map. Its pooled value is added to the slice score with its weight times `slice_weight`, the
ratio of the local score's spread to its own on held-out normal slices (fitted by the calibration), so
that weight 1 gives both terms the same say on normal data.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ScoreConfig

MIN_SLICES_PER_BIN = 20


@dataclass
class BatchScores:
    """Scores of one batch: the slice score (n,), each component's pooled normalised value (n,) and the
    anomaly map (n, S, S) at model resolution (zero outside the body)."""

    score: torch.Tensor
    components: Dict[str, torch.Tensor]
    pixel_map: torch.Tensor


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing (sigma in pixels) of (..., H, W) maps."""
    if sigma <= 0:
        return maps
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    k = gaussian_kernel(sigma).to(x)
    r = (k.numel() - 1) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(shape)


def position_bins(positions: torch.Tensor, bins: int) -> torch.Tensor:
    return (positions.float() * bins).clamp(0, bins - 1e-6).long()


def neighbour_max(scores: np.ndarray, case: np.ndarray, index: np.ndarray, reach: int):
    """For each slice, the highest score among the slices of the same case within `reach` slice indices,
    and the index of the slice it came from. Anomalies are 3D: the thin end slices of a lesion take the
    score of its centre."""
    scores = np.asarray(scores, dtype=float)
    best, source = scores.copy(), np.asarray(index).copy()
    if reach <= 0:
        return best, source
    order = np.lexsort((index, case))
    for shift in range(1, reach + 1):
        for a, b in ((order[:-shift], order[shift:]), (order[shift:], order[:-shift])):
            near = (case[a] == case[b]) & (np.abs(index[a] - index[b]) <= reach)
            better = near & (scores[b] > best[a])
            best[a[better]] = scores[b[better]]
            source[a[better]] = index[b[better]]
    return best, source


class MapStatistics(torch.nn.Module):
    """Per-component, per-position-bin, per-pixel mean and floored scale of normal maps (buffers, so they
    are saved and checksummed with the networks)."""

    def __init__(self, components: Sequence[str], bins: int, size: int, whole_slice: Sequence[str] = ()):
        super().__init__()
        self.names = list(components)
        self.whole_slice = list(whole_slice)
        self.register_buffer("mean", torch.zeros(len(self.names), bins, size, size))
        self.register_buffer("scale", torch.ones(len(self.names), bins, size, size))
        if self.whole_slice:  # only then: the bundles of other backends keep their tensor file
            self.register_buffer("slice_weight", torch.ones(len(self.whole_slice)))

    @classmethod
    def for_components(cls, components, bins: int, size: int) -> "MapStatistics":
        """Empty statistics for a backend's `ScoreComponent`s."""
        return cls([c.name for c in components], bins, size, [c.name for c in components if c.whole_slice])

    @property
    def bins(self) -> int:
        return self.mean.shape[1]

    def normalise(self, maps: Dict[str, torch.Tensor], positions: torch.Tensor) -> Dict[str, torch.Tensor]:
        b = position_bins(positions, self.bins)
        return {name: (maps[name].float() - self.mean[c, b]) / self.scale[c, b] for c, name in enumerate(self.names)}


class MapStatisticsAccumulator:
    """Sums of normal maps per bin, streamed batch by batch, turned into `MapStatistics` at the end."""

    def __init__(self, components: Sequence[str], bins: int, size: int, whole_slice: Sequence[str] = ()):
        self.names = list(components)
        self.whole_slice = list(whole_slice)
        shape = (len(self.names), bins, size, size)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.body_sum = torch.zeros(len(self.names), dtype=torch.float64)
        self.body_sq = torch.zeros(len(self.names), dtype=torch.float64)
        self.body_count = 0.0

    def add(self, maps: Dict[str, torch.Tensor], positions: torch.Tensor, body: torch.Tensor) -> None:
        b = position_bins(positions.cpu(), self.count.numel())
        inside = body.reshape(body.shape[0], *body.shape[-2:]).cpu()
        for c, name in enumerate(self.names):
            m = maps[name].double().cpu()
            self.sum[c].index_add_(0, b, m)
            self.sum_sq[c].index_add_(0, b, m * m)
            self.body_sum[c] += m[inside].sum()
            self.body_sq[c] += (m[inside] ** 2).sum()
        self.count += torch.bincount(b, minlength=self.count.numel()).double()
        self.body_count += float(inside.sum())

    def finish(self, pixel_floor: float, sigma_px: float, per_pixel: bool = True) -> MapStatistics:
        """Statistics per pixel, with a bin holding too few slices replaced by all slices; `per_pixel` False
        gives one mean and scale per component over the body (what one patient's slices can support: per
        pixel they would learn that patient's anatomy)."""
        bins = self.count.numel()
        stats = MapStatistics(self.names, bins, self.sum.shape[-1], self.whole_slice)
        total = self.count.sum().clamp_min(1)
        global_mean = self.sum.sum(dim=1) / total
        global_var = (self.sum_sq.sum(dim=1) / total - global_mean**2).clamp_min(0)
        n_body = max(self.body_count, 1.0)
        body_mean = self.body_sum / n_body
        body_std = (self.body_sq / n_body - body_mean**2).clamp_min(0).sqrt()
        if not per_pixel:
            stats.mean.copy_(body_mean.float().view(-1, 1, 1, 1).expand_as(stats.mean))
            stats.scale.copy_(body_std.float().clamp_min(1e-6).view(-1, 1, 1, 1).expand_as(stats.scale))
            return stats
        for b in range(bins):
            if self.count[b] >= MIN_SLICES_PER_BIN:
                mean = self.sum[:, b] / self.count[b]
                var = (self.sum_sq[:, b] / self.count[b] - mean**2).clamp_min(0)
            else:
                mean, var = global_mean, global_var
            stats.mean[:, b] = smooth(mean.float(), sigma_px)
            stats.scale[:, b] = smooth(var.float(), sigma_px).sqrt()
        floor = (pixel_floor * body_std.float()).clamp_min(1e-6).view(-1, 1, 1, 1)
        stats.scale.copy_(torch.maximum(stats.scale, floor))
        return stats


class MapScorer:
    """Turns raw component maps into `BatchScores` (see the module docstring)."""

    def __init__(
        self, weights: Dict[str, float], statistics: MapStatistics, config: ScoreConfig, pixel_mm: Optional[float]
    ):
        self.weights = weights
        self.statistics = statistics
        size = statistics.mean.shape[-1]
        pixel_area = pixel_mm**2 if pixel_mm else (400.0 / size) ** 2
        self.top_k = max(1, int(round(config.score_area_mm2 / pixel_area)))
        self.sigma_px = config.map_sigma_mm / pixel_mm if pixel_mm else 1.0

    def __call__(self, raw: Dict[str, torch.Tensor], positions: torch.Tensor, body: torch.Tensor) -> BatchScores:
        inside = body.reshape(body.shape[0], *body.shape[-2:]).float()
        z = {name: smooth(v.clamp_min(0), self.sigma_px) * inside for name, v in
             self.statistics.normalise(raw, positions).items()}  # fmt: skip
        whole = self.statistics.whole_slice
        pixel_map = sum(self.weights[name] * v for name, v in z.items() if name not in whole)
        components = {name: self.pool(v) for name, v in z.items()}
        return BatchScores(self.pool(pixel_map) + self.whole_slice_terms(components), components, pixel_map)

    def whole_slice_terms(self, components: Dict[str, torch.Tensor]):
        """What the whole-slice components add to the slice score: each pooled value (n,) times its weight
        and its `slice_weight` (0 for a backend without whole-slice components)."""
        terms = 0.0
        for k, name in enumerate(self.statistics.whole_slice):
            terms = terms + self.weights[name] * self.statistics.slice_weight[k] * components[name]
        return terms

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """The localised slice score of (n, S, S) maps: the mean of their top `score_area_mm2`."""
        flat = maps.flatten(1)
        k = min(self.top_k, flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1)
