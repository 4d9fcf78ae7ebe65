"""DeScarGAN (Wolleb et al. 2020): translation between a healthy and a patient class, and the difference
between a slice and its healthy translation as the anomaly map.

A class-conditioned U-Net generator G(x, c) (the target class as two constant planes) translates slices
to class c; a critic scores patch realness and classifies the slice (healthy or patient). Losses: WGAN-GP
for realness, the critic's class loss on real slices, and for G the class loss on its translations, a
cycle term |G(G(x, c'), c) - x| and an identity term |G(x, c) - x|. Training data: the normal scans
(healthy) and slices confirmed abnormal (`--patients`: the decisions "abnormal" of a reviewed folder, or
the masked slices of abnormal scans). Calibrated on held-out normal slices like every backend.

Score: **difference** |x - G(x, healthy)|, averaged over the window channels.
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import sample_slices
from .base import PATIENTS, DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .penalties import gradient_penalty
from .restoration_networks import PatchCritic, UNet, UNetArchitecture, condition_like, expect_levels_fit, widths_for

CONDITION_CHANNELS = 3
CLASSES = 2  # 0 healthy, 1 patient
HEALTHY, PATIENT = 0, 1


@dataclass
class DeScarGANOptions:
    iterations: int = option(3000, "training steps (each: a critic and a generator update)")
    batch_size: int = option(8, "slices per step, half healthy and half patient")
    learning_rate: float = option(1e-4, "Adam learning rate")
    gradient_penalty: float = option(10.0, "WGAN-GP gradient penalty weight")
    critic_class_weight: float = option(5.0, "weight of the critic's class loss on real slices")
    generator_class_weight: float = option(1.0, "weight of the class loss on the generator's translations")
    cycle_weight: float = option(50.0, "weight of the cycle term |G(G(x, c'), c) - x|")
    identity_weight: float = option(50.0, "weight of the identity term |G(x, c) - x|")
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        for name in ("iterations", "batch_size"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        expect(self.batch_size >= 2, "batch_size", "at least 2 (one healthy, one patient slice)", self.batch_size)
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("gradient_penalty", "critic_class_weight", "generator_class_weight", "cycle_weight",
                     "identity_weight"):  # fmt: skip
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))


class ClassCritic(torch.nn.Module):
    """A patch critic (realness per patch) with a class head on its feature map."""

    def __init__(self, in_ch: int, width: int):
        super().__init__()
        self.patches = PatchCritic(in_ch, width)
        self.classes = torch.nn.Linear(2 * width, CLASSES)

    def forward(self, x):
        realness, features = self.patches(x)
        return realness.mean(dim=(1, 2, 3)), self.classes(features.mean(dim=(2, 3)))


class DeScarGANBackend(DetectorBackend):
    name = "descargan"
    summary = "DeScarGAN: healthy/patient translation, anomaly = |x - healthy(x)| (needs --patients)"
    Architecture = UNetArchitecture
    Options = DeScarGANOptions
    components = (
        ScoreComponent("difference", "|x - G(x, healthy)|: the slice minus its healthy translation, normalised"),
    )
    training_inputs = (PATIENTS,)

    @classmethod
    def tiny(cls):
        return (
            UNetArchitecture(base_width=4, levels=3, critic_width=4),
            DeScarGANOptions(iterations=10, batch_size=4),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        expect_levels_fit(architecture.levels, inputs.image_size)

    def __init__(self, architecture: UNetArchitecture, inputs):
        super().__init__(architecture, inputs)
        c = inputs.num_channels
        self.generator = UNet(
            c + CLASSES + CONDITION_CHANNELS, c, widths_for(architecture.base_width, architecture.levels)
        )
        self.critic = ClassCritic(c + CONDITION_CHANNELS, architecture.critic_width)
        self.eval()

    def networks(self):
        return {"generator": self.generator, "critic": self.critic}

    @classmethod
    def stages(cls, options: DeScarGANOptions):
        return (TrainingStage("translation", "healthy/patient translation", 1.0, "iterations"),)

    def _condition(self, x, pos):
        return condition_like(x, pos, self.architecture.condition_on_position)

    def _translate(self, x, cond, target):
        """G(x, target class) in window units."""
        planes = F.one_hot(target, CLASSES).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return torch.tanh(self.generator(torch.cat([x, planes, cond], dim=1)))

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        xw = self.inputs.channels(x)
        healthy = torch.full((xw.shape[0],), HEALTHY, dtype=torch.long, device=xw.device)
        translated = self._translate(xw, self._condition(xw, pos), healthy)
        return {"difference": (xw.float() - translated.float()).abs().mean(dim=1)}

    def fit(self, data: TrainingData, options: DeScarGANOptions, run: TrainingRun) -> None:
        gen, device = run.generator, run.device
        patients = data.extra[PATIENTS.name]
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=options.learning_rate, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=(0.5, 0.999))
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d}
        nets = self.networks()
        run.restore(nets, optimizers)
        n_healthy = options.batch_size // 2

        def draw(source: TrainingData, n: int):
            return sample_slices(source, n, self.inputs, gen, options.augment, device)

        def step(k, fraction):
            self.train_mode()
            xh, ph = draw(data, n_healthy)
            xp, pp = draw(patients, options.batch_size - n_healthy)
            x = torch.cat([xh, xp])
            cond = self._condition(x, torch.cat([ph, pp]))
            label = torch.cat([torch.full((len(xh),), HEALTHY), torch.full((len(xp),), PATIENT)]).to(device)
            other = 1 - label
            # Critic: realness (WGAN-GP) and the class of real slices.
            with torch.no_grad():
                fake = self._translate(x, cond, other)
            real_score, real_class = self.critic(torch.cat([x, cond], 1))
            fake_score, _ = self.critic(torch.cat([fake, cond], 1))
            penalty = gradient_penalty(lambda v: self.critic(torch.cat([v, cond], 1))[0], x, fake, gen)
            loss_d = fake_score.mean() - real_score.mean() + options.gradient_penalty * penalty
            loss_d = loss_d + options.critic_class_weight * F.cross_entropy(real_class, label)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # Generator: realistic translations of the asked class, a cycle back, identity on its own class.
            fake = self._translate(x, cond, other)
            fake_score, fake_class = self.critic(torch.cat([fake, cond], 1))
            cycle = (self._translate(fake, cond, label) - x).abs().mean()
            identity = (self._translate(x, cond, label) - x).abs().mean()
            loss_g = -fake_score.mean() + options.generator_class_weight * F.cross_entropy(fake_class, other)
            loss_g = loss_g + options.cycle_weight * cycle + options.identity_weight * identity
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            return {"critic": loss_d.item(), "cycle": cycle.item(), "identity": identity.item()}

        try:
            run.run_stage(self.stages(options)[0], options.iterations, step, nets, optimizers)
        finally:
            self.eval()
