"""Restoration GAN: a skip-connected generator restores normal slices from generic corruptions, a patch
critic gives the adversarial term and the feature layer, and a discriminative head learns to point at
what was corrupted. The default backend.

Training (normal slices only, random crops with their coordinates): each crop is corrupted by one of
the generic families of `corruptions` (or left clean); the generator G learns to restore the clean crop
(L1 inside the body, plus the critic's adversarial and feature-matching terms); the critic D learns to
tell clean crops from restorations (least squares); the segmenter S sees the corrupted crop, its
restoration and their difference and learns the corruption label (focal + Dice). Scoring runs the three
on whole slices:

- reconstruction R = |x - G(x)|, averaged over the window channels;
- feature F = |f(x) - f(G(x))|^2 on the critic's feature map, upsampled;
- discriminative = sigmoid(S(x, G(x), x - G(x))).
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import augment_batch, body_masks
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .corruptions import MAX_BLOB_COVERAGE, corrupt, corruption_mix
from .izif import residual_maps
from .restoration_networks import (
    MAX_LEVELS,
    MAX_WIDTH,
    PatchCritic,
    UNet,
    UNetDecoder,
    UNetEncoder,
    condition_like,
    expect_levels_fit,
    widths_for,
)

CONDITION_CHANNELS = 3  # position plane, y and x coordinates


@dataclass
class RestorationArchitecture:
    base_width: int = option(16, "channels of the generator's first level (doubling at each level)")
    levels: int = option(4, "resolution levels of the generator and segmenter U-Nets")
    segmenter_width: int = option(16, "channels of the segmenter's first level")
    critic_width: int = option(16, "channels of the critic's first convolution")
    condition_on_position: bool = option(True, "do not condition on the slice position", flag="--no-position")

    def validate(self) -> None:
        expect(2 <= self.levels <= MAX_LEVELS, "levels", f"2 to {MAX_LEVELS}", self.levels)
        most = MAX_WIDTH // 2 ** (self.levels - 1)  # widths double at each level
        for name in ("base_width", "segmenter_width"):
            width = getattr(self, name)
            expect(1 <= width <= most, name, f"1 to {most} for {self.levels} levels", width)
        expect(1 <= self.critic_width <= MAX_WIDTH // 4, "critic_width", f"1 to {MAX_WIDTH // 4}", self.critic_width)


@dataclass
class RestorationOptions:
    iterations: int = option(6000, "training steps (each: a batch of crops through G, D and S)")
    batch_size: int = option(32, "crops per step")
    crop_size: int = option(64, "side of the random training crops in pixels (the whole slice if larger)")
    learning_rate: float = option(3e-4, "Adam learning rate, cosine-decayed to zero")
    adversarial_weight: float = option(0.01, "weight of the critic's adversarial term in the generator loss")
    feature_weight: float = option(0.1, "weight of the feature-matching term in the generator loss")
    segmentation_weight: float = option(1.0, "weight of the segmenter's loss")
    clean_share: float = option(0.15, "share of crops left uncorrupted")
    band_share: float = option(0.18, "share of corrupted crops that get thin bands (the other families keep "
                               "their proportions, coarse noise : blobs : foreign patches = 24 : 41 : 17)",
                               added=True)  # fmt: skip
    min_blob_coverage: float = option(0.002, "smallest intensity blob, as a share of the crop (sizes are "
                                      "log-uniform up to 0.05)", added=True)  # fmt: skip
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        for name in ("iterations", "batch_size", "crop_size"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("adversarial_weight", "feature_weight", "segmentation_weight"):
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))
        for name in ("clean_share", "band_share"):
            expect(0 <= getattr(self, name) <= 1, name, "a share from 0 to 1", getattr(self, name))
        most = MAX_BLOB_COVERAGE
        expect(0 < self.min_blob_coverage <= most, "min_blob_coverage", f"above 0, at most {most}",
               self.min_blob_coverage)  # fmt: skip


class RestorationBackend(DetectorBackend):
    name = "restoration"
    summary = "restoration GAN: skip-connected generator, patch critic and discriminative head (default)"
    Architecture = RestorationArchitecture
    Options = RestorationOptions
    components = (
        ScoreComponent("reconstruction", "restoration residual |x - G(x)|, normalised by normal slices", 0.25),
        ScoreComponent("feature", "critic feature distance |f(x) - f(G(x))|^2, normalised", 0.25),
        ScoreComponent("discriminative", "discriminative head's anomaly probability, normalised", 1.0),
    )

    @classmethod
    def tiny(cls):
        return (
            RestorationArchitecture(base_width=8, levels=3, segmenter_width=8, critic_width=8),
            RestorationOptions(iterations=20, batch_size=8, crop_size=32),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        expect_levels_fit(architecture.levels, inputs.image_size)

    def __init__(self, architecture: RestorationArchitecture, inputs):
        super().__init__(architecture, inputs)
        c = inputs.num_channels
        widths = widths_for(architecture.base_width, architecture.levels)
        self.encoder = UNetEncoder(c + CONDITION_CHANNELS, widths)
        self.generator = UNetDecoder(widths, c)
        self.critic = PatchCritic(c + CONDITION_CHANNELS, architecture.critic_width)
        self.segmenter = UNet(
            3 * c + CONDITION_CHANNELS, 1, widths_for(architecture.segmenter_width, architecture.levels)
        )
        self.eval()

    def networks(self):
        return {
            "encoder": self.encoder,
            "generator": self.generator,
            "critic": self.critic,
            "segmenter": self.segmenter,
        }

    @classmethod
    def stages(cls, options):
        return (TrainingStage("restoration", "restoration GAN and discriminative head", 1.0, "iterations"),)

    def _condition(self, x, pos, top=None, left=None):
        return condition_like(x, pos, self.architecture.condition_on_position, top, left, self.inputs.image_size)

    def _restore(self, xw, cond):
        """G(x) for windowed slices (tanh: window units)."""
        return torch.tanh(self.generator(self.encoder(torch.cat([xw, cond], dim=1))))

    def _segment(self, xw, restored, cond):
        """Segmenter logits from the slice, its restoration and their difference."""
        return self.segmenter(torch.cat([xw, restored, xw - restored, cond], dim=1))

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        xw = self.inputs.channels(x)
        cond = self._condition(xw, pos)
        restored = self._restore(xw, cond)
        logits = self._segment(xw, restored, cond)
        _, fx = self.critic(torch.cat([xw, cond], dim=1))
        _, fr = self.critic(torch.cat([restored.to(xw.dtype), cond], dim=1))
        return {**residual_maps(xw, restored, fx, fr), "discriminative": torch.sigmoid(logits.float())[:, 0]}

    def fit(self, data: TrainingData, options: RestorationOptions, run: TrainingRun) -> None:
        gen, device, spec = run.generator, run.device, self.inputs
        size = spec.image_size
        crop = min(options.crop_size, size)
        opt_g = torch.optim.Adam(list(self.encoder.parameters()) + list(self.generator.parameters()),
                                 lr=options.learning_rate, betas=(0.5, 0.999))  # fmt: skip
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=(0.5, 0.999))
        opt_s = torch.optim.Adam(self.segmenter.parameters(), lr=options.learning_rate, betas=(0.9, 0.999))
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d, "opt_segmenter": opt_s}
        nets = self.networks()
        for net in nets.values():  # faster convolutions on the CPU's oneDNN (about 1.3x a step)
            net.to(memory_format=torch.channels_last)
        run.restore(nets, optimizers)
        mix = corruption_mix(options.clean_share, options.band_share)
        bodies = body_masks(data, spec)

        def step(k, fraction):
            for opt in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = (
                        options.learning_rate * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * fraction)).item())
                    )
            idx = torch.randint(len(data), (options.batch_size,), generator=gen)
            top = torch.randint(0, size - crop + 1, (options.batch_size,), generator=gen).tolist()
            left = torch.randint(0, size - crop + 1, (options.batch_size,), generator=gen).tolist()
            boxes = list(zip(idx.tolist(), top, left))
            x = torch.stack([data.images[i, :, t : t + crop, c : c + crop] for i, t, c in boxes]).float()
            body = torch.stack([bodies[i, :, t : t + crop, c : c + crop] for i, t, c in boxes])
            pos = data.positions[idx].float()
            corrupted, label = corrupt(x, body, spec.intensity_unit, gen, mix, floor=spec.pad_value,
                                       min_coverage=options.min_blob_coverage)  # fmt: skip
            clean_w, corrupt_w = spec.channels(x), spec.channels(corrupted)
            if options.augment:  # the same geometric transform for clean and corrupted: one call on both
                both = augment_batch(torch.cat([clean_w, corrupt_w, label.float(), body.float()], dim=1), gen, 0.0)
                c = clean_w.shape[1]
                clean_w, corrupt_w = both[:, :c], both[:, c : 2 * c]
                label, body = both[:, 2 * c : 2 * c + 1] > 0.5, both[:, 2 * c + 1 :] > 0.5
            clean_w, corrupt_w = clean_w.to(device), corrupt_w.to(device)
            label, inside = label.float().to(device), body.float().to(device)
            cond = self._condition(clean_w, pos, top, left)
            self.train_mode()

            with run.autocast():
                restored = self._restore(corrupt_w, cond)
                # Critic: clean crops real, restorations fake (least squares).
                real_logit, _ = self.critic(torch.cat([clean_w, cond], 1))
                fake_logit, _ = self.critic(torch.cat([restored.detach(), cond], 1))
            loss_d = ((real_logit.float() - 1) ** 2).mean() + (fake_logit.float() ** 2).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # Generator: restore the clean crop; fool the critic; match its features.
            with run.autocast():
                fake_logit, f_fake = self.critic(torch.cat([restored, cond], 1))
                with torch.no_grad():
                    _, f_real = self.critic(torch.cat([clean_w, cond], 1))
                # Segmenter: find the corruption (focal + soft Dice); its gradient does not reach G.
                logits = self._segment(corrupt_w, restored.detach(), cond)
            restored, logits = restored.float(), logits.float()
            l1 = ((restored - clean_w).abs() * inside).sum() / (inside.sum() * clean_w.shape[1] + 1)
            loss_g = l1 + options.adversarial_weight * ((fake_logit.float() - 1) ** 2).mean()
            loss_g = loss_g + options.feature_weight * F.mse_loss(f_fake.float(), f_real.float())
            p = torch.sigmoid(logits)
            focal = F.binary_cross_entropy_with_logits(logits, label, reduction="none") * (p - label).abs() ** 2
            dice = 1 - (2 * (p * label).sum() + 1) / (p.sum() + label.sum() + 1)
            loss_s = options.segmentation_weight * (10 * focal.mean() + dice)
            opt_g.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            (loss_g + loss_s).backward()
            opt_g.step()
            opt_s.step()
            return {"restore_l1": l1.item(), "critic": loss_d.item(), "segmenter": loss_s.item()}

        try:
            run.run_stage(self.stages(options)[0], options.iterations, step, nets, optimizers)
        finally:
            for net in nets.values():  # safetensors stores contiguous tensors
                net.to(memory_format=torch.contiguous_format)
            self.eval()
