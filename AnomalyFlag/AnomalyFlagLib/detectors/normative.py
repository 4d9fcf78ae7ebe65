"""A normative baseline without a network: per-position, per-pixel statistics of the windowed intensities.

Training takes the mean and standard deviation of every input channel at every (body-centred) pixel in
bins of slice position; a slice's map is its largest absolute z-score over the channels. It is the floor
the trained backends must beat: what it misses is not visible from intensity statistics alone.
"""

from dataclasses import dataclass

import torch

from ..config import MAX_POSITION_BINS, expect
from ..maps import position_bins, smooth
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option


@dataclass
class NormativeArchitecture:
    position_bins: int = option(8, "bins of relative slice position with their own pixel statistics")
    std_floor: float = option(0.05, "smallest standard deviation, in window units (a window spans 2)")
    sigma_px: float = option(1.5, "in-plane smoothing of the standard deviation, in pixels")

    def validate(self) -> None:
        bins = self.position_bins
        expect(1 <= bins <= MAX_POSITION_BINS, "position_bins", f"1 to {MAX_POSITION_BINS}", bins)
        expect(0 < self.std_floor <= 2, "std_floor", "above 0, at most 2 (window units)", self.std_floor)
        expect(0 <= self.sigma_px <= 50, "sigma_px", "0 to 50 pixels", self.sigma_px)


@dataclass
class NormativeOptions:
    batch_size: int = option(64, "slices per accumulation step")

    def validate(self) -> None:
        expect(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)


class _Statistics(torch.nn.Module):
    def __init__(self, bins: int, channels: int, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(bins, channels, size, size))
        self.register_buffer("std", torch.ones(bins, channels, size, size))


class NormativeBackend(DetectorBackend):
    name = "normative"
    summary = "normative baseline: per-position, per-pixel z-score of the windowed intensities (no network)"
    Architecture = NormativeArchitecture
    Options = NormativeOptions
    components = (ScoreComponent("intensity", "largest |z| of the windowed intensities against normal slices"),)

    @classmethod
    def tiny(cls):
        return NormativeArchitecture(), NormativeOptions()

    def __init__(self, architecture: NormativeArchitecture, inputs):
        super().__init__(architecture, inputs)
        self.statistics = _Statistics(architecture.position_bins, inputs.num_channels, inputs.image_size)

    def networks(self):
        return {"statistics": self.statistics}

    @classmethod
    def stages(cls, options):
        return (TrainingStage("statistics", "pixel statistics"),)

    def fit(self, data: TrainingData, options: NormativeOptions, run: TrainingRun) -> None:
        # One step of seconds: the statistics are complete whenever a checkpoint holds them.
        run.run_stage(self.stages(options)[0], 1, lambda step, fraction: self._accumulate(data, options, run),
                      self.networks(), {})  # fmt: skip

    def _accumulate(self, data: TrainingData, options: NormativeOptions, run: TrainingRun) -> dict:
        arch = self.architecture
        bins = position_bins(data.positions, arch.position_bins)
        shape = self.statistics.mean.shape
        total = torch.zeros(shape, dtype=torch.float64)
        total_sq = torch.zeros(shape, dtype=torch.float64)
        count = torch.zeros(arch.position_bins, dtype=torch.float64)
        for k0 in range(0, len(data), options.batch_size):
            sl = slice(k0, k0 + options.batch_size)
            x = self.inputs.channels(data.images[sl]).double()
            total.index_add_(0, bins[sl], x)
            total_sq.index_add_(0, bins[sl], x * x)
            count.add_(torch.bincount(bins[sl], minlength=arch.position_bins).double())
        for sums in (total, total_sq, count):  # each training process holds a share of the slices
            run.parallel.all_reduce_sum(sums)
        # A bin without slices borrows the statistics of all slices.
        n = count.view(-1, 1, 1, 1)
        mean = torch.where(n > 0, total / n.clamp_min(1), total.sum(0) / count.sum())
        sq = torch.where(n > 0, total_sq / n.clamp_min(1), total_sq.sum(0) / count.sum())
        std = smooth((sq - mean**2).clamp_min(0).float(), arch.sigma_px).sqrt()
        self.statistics.mean.copy_(mean.float())
        self.statistics.std.copy_(std.clamp_min(arch.std_floor))
        return {"slices": float(count.sum())}

    @torch.no_grad()
    def maps(self, x, pos, body):
        b = position_bins(pos, self.architecture.position_bins)
        z = (self.inputs.channels(x) - self.statistics.mean[b]) / self.statistics.std[b]
        return {"intensity": z.abs().amax(dim=1)}
