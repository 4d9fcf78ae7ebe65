"""ASC-Net (Dey & Hong 2021): adversarial selective cutting of a slice into a part that fits the normal
reference set (the fence cut) and a part that holds what does not (the wild cut).

One U-Net encoder feeds two decoders, one per cut (in [0, 1] window units); a 1x1 recombination of the
two reconstructs the input (MSE); a Dice-overlap loss keeps the cuts disjoint; a patch critic pushes
the fence cut onto the reference set, the normal scans (least squares). The slices it learns to cut are
the unlabelled scans (`--unlabelled`) and, as `normal_share` of each batch, normal slices, whose wild cut
is also held to zero (`wild_weight`), so that the model cuts scans it never saw, not only its archive.

Training runs unattended, replacing the paper's manual stopping and its threshold at a histogram peak:
every `check_every` steps the wild cut and the reconstruction error of held-out normal slices (every
10th normal training slice, never trained on) are measured, and training stops when their sum has not
improved for `patience` checks. The flags come from the calibrated thresholds, as for every backend.

Score: **wild** = the wild cut, averaged over the window channels.
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import sample_slices
from .base import UNLABELLED, DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .restoration_networks import (
    PatchCritic,
    UNetArchitecture,
    UNetDecoder,
    UNetEncoder,
    condition_like,
    expect_levels_fit,
    widths_for,
)

CONDITION_CHANNELS = 3
STOPPING_SLICES = 10  # every 10th normal training slice is held out for the stopping rule


@dataclass
class ASCNetOptions:
    iterations: int = option(3000, "most training steps (the stopping rule may end training earlier)")
    batch_size: int = option(8, "slices per step")
    learning_rate: float = option(2e-4, "Adam learning rate")
    adversarial_weight: float = option(1.0, "weight of the critic's term on the fence cut")
    disjoint_weight: float = option(1.0, "weight of the Dice overlap between the two cuts")
    wild_weight: float = option(1.0, "weight of the wild cut's mean on normal slices (held to zero)")
    normal_share: float = option(0.5, "share of each batch that is normal slices (the rest: unlabelled ones)")
    check_every: int = option(100, "steps between two checks of the stopping rule")
    patience: int = option(5, "checks without improvement before training stops")
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        for name in ("iterations", "batch_size", "check_every", "patience"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("adversarial_weight", "disjoint_weight", "wild_weight"):
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))
        expect(0 <= self.normal_share < 1, "normal_share", "0 or more, below 1", self.normal_share)


class StoppingRule(torch.nn.Module):
    """Patience on a held-out loss; buffers, so that a resumed run remembers the best value so far."""

    def __init__(self):
        super().__init__()
        self.register_buffer("best", torch.tensor(float("inf")))
        self.register_buffer("checks_since_best", torch.tensor(0))

    def update(self, loss: float, patience: int) -> bool:
        """Record a check; True when `patience` checks have passed without a new best."""
        if loss < float(self.best):
            self.best.fill_(loss)
            self.checks_since_best.zero_()
        else:
            self.checks_since_best.add_(1)
        return int(self.checks_since_best) >= patience


class Cutter(torch.nn.Module):
    """U-Net encoder, fence and wild decoders, and the 1x1 recombination."""

    def __init__(self, arch: UNetArchitecture, channels: int):
        super().__init__()
        widths = widths_for(arch.base_width, arch.levels)
        self.encoder = UNetEncoder(channels + CONDITION_CHANNELS, widths)
        self.fence = UNetDecoder(widths, channels)
        self.wild = UNetDecoder(widths, channels)
        self.recombine = torch.nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x01, cond):
        """(fence cut, wild cut, recombination), each in [0, 1], of slices in [0, 1]."""
        features = self.encoder(torch.cat([x01, cond], dim=1))
        fence, wild = torch.sigmoid(self.fence(features)), torch.sigmoid(self.wild(features))
        return fence, wild, torch.sigmoid(self.recombine(torch.cat([fence, wild], dim=1)))


def dice_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (2 * (a * b).sum() + 1) / (a.sum() + b.sum() + 1)


class ASCNetBackend(DetectorBackend):
    name = "ascnet"
    summary = "ASC-Net: cuts slices into a normal-looking fence cut and a wild cut (needs --unlabelled)"
    Architecture = UNetArchitecture
    Options = ASCNetOptions
    components = (ScoreComponent("wild", "ASC-Net's wild cut (what does not fit the normal scans), normalised"),)
    training_inputs = (UNLABELLED,)

    @classmethod
    def tiny(cls):
        return (
            UNetArchitecture(base_width=4, levels=3, critic_width=4),
            ASCNetOptions(iterations=12, batch_size=4, check_every=4, patience=2),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        expect_levels_fit(architecture.levels, inputs.image_size)

    def __init__(self, architecture: UNetArchitecture, inputs):
        super().__init__(architecture, inputs)
        c = inputs.num_channels
        self.cutter = Cutter(architecture, c)
        self.critic = PatchCritic(c + CONDITION_CHANNELS, architecture.critic_width)
        self.stopping = StoppingRule()
        self.eval()

    def networks(self):
        return {"cutter": self.cutter, "critic": self.critic, "stopping": self.stopping}

    @classmethod
    def stages(cls, options: ASCNetOptions):
        return (TrainingStage("cutting", "selective cutting", 1.0, "iterations"),)

    def _condition(self, x, pos):
        return condition_like(x, pos, self.architecture.condition_on_position)

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        x01 = (self.inputs.channels(x) + 1) / 2
        _, wild, _ = self.cutter(x01, self._condition(x01, pos))
        return {"wild": wild.float().mean(dim=1)}

    def fit(self, data: TrainingData, options: ASCNetOptions, run: TrainingRun) -> None:
        gen, device = run.generator, run.device
        unlabelled = data.extra[UNLABELLED.name]
        held = torch.arange(len(data)) % STOPPING_SLICES == STOPPING_SLICES - 1
        normal = TrainingData(data.images[~held], data.positions[~held])
        check = TrainingData(data.images[held], data.positions[held])
        opt_g = torch.optim.Adam(self.cutter.parameters(), lr=options.learning_rate, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=(0.5, 0.999))
        optimizers = {"opt_cutter": opt_g, "opt_critic": opt_d}
        nets = self.networks()
        run.restore(nets, optimizers)
        n_normal = int(round(options.batch_size * options.normal_share))

        def draw(source: TrainingData, n: int):
            x, pos = sample_slices(source, n, self.inputs, gen, options.augment, device)
            return (x + 1) / 2, pos

        def step(k, fraction):
            self.train_mode()
            xn, pn = draw(normal, n_normal)
            xu, pu = draw(unlabelled, options.batch_size - n_normal)
            x, pos = torch.cat([xn, xu]), torch.cat([pn, pu])
            cond = self._condition(x, pos)
            fence, wild, recombined = self.cutter(x, cond)
            reference, ref_pos = draw(normal, options.batch_size)
            real, _ = self.critic(torch.cat([reference * 2 - 1, self._condition(reference, ref_pos)], 1))
            fake, _ = self.critic(torch.cat([fence.detach() * 2 - 1, cond], 1))
            loss_d = ((real - 1) ** 2).mean() + (fake**2).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            fooled, _ = self.critic(torch.cat([fence * 2 - 1, cond], 1))
            loss_rec = F.mse_loss(recombined, x)
            loss_g = (loss_rec + options.adversarial_weight * ((fooled - 1) ** 2).mean()
                      + options.disjoint_weight * dice_overlap(fence, wild)
                      + options.wild_weight * wild[:n_normal].mean())  # fmt: skip
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            info = {"reconstruction": loss_rec.item(), "critic": loss_d.item()}
            if (k + 1) % options.check_every == 0:
                info["held_out"] = self._held_out_loss(check, device)
                info["converged"] = float(self.stopping.update(info["held_out"], options.patience))
            return info

        try:
            run.run_stage(self.stages(options)[0], options.iterations, step, nets, optimizers)
        finally:
            self.eval()

    @torch.no_grad()
    def _held_out_loss(self, check: TrainingData, device) -> float:
        """Mean wild cut plus reconstruction error of the held-out normal slices (lower is better)."""
        self.eval()
        total = 0.0
        for k in range(0, len(check), 32):
            x = ((self.inputs.channels(check.images[k : k + 32]) + 1) / 2).to(device)
            _, wild, recombined = self.cutter(x, self._condition(x, check.positions[k : k + 32].float()))
            total += (wild.mean(dim=(1, 2, 3)) + ((recombined - x) ** 2).mean(dim=(1, 2, 3))).sum().item()
        self.train_mode()
        return total / max(1, len(check))
