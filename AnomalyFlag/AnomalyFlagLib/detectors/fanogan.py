"""f-AnoGAN (Schlegl et al. 2019): WGAN-GP on normal slices, then an izif encoder with G and D frozen.

Kept as the literature baseline: its latent bottleneck cannot reproduce normal detail, so its residual
is large at every tissue edge (see docs/detector-experiments.md).
"""

from dataclasses import dataclass
from functools import partial
from typing import Dict

import torch

from ..config import expect
from .augment import sample_slices
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .dcgan_networks import Critic, DCGANArchitecture, Encoder, Generator, Shape, validate_size
from .izif import residual_maps, train_izif_encoder
from .penalties import gradient_penalty


@dataclass
class FAnoGANOptions:
    batch_size: int = option(32, "slices per training step")
    gan_iterations: int = option(2000, "stage 1 (WGAN-GP) generator steps")
    encoder_iterations: int = option(1000, "stage 2 (izif encoder) steps")
    critic_steps: int = option(5, "critic steps per generator step")
    gradient_penalty: float = option(10.0, "WGAN-GP gradient penalty weight")
    learning_rate: float = option(1e-4, "Adam learning rate (the encoder uses twice this)")
    kappa: float = option(1.0, "weight of the feature term in the encoder loss")
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        for name in ("batch_size", "gan_iterations", "encoder_iterations", "critic_steps"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("gradient_penalty", "kappa"):
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))


class FAnoGANBackend(DetectorBackend):
    name = "fanogan"
    summary = "f-AnoGAN: WGAN-GP generator and critic, then an izif encoder (reconstruction through a latent code)"
    Architecture = DCGANArchitecture
    Options = FAnoGANOptions
    components = (
        ScoreComponent("reconstruction", "residual |x - G(E(x))|, normalised by normal slices"),
        ScoreComponent("feature", "critic feature distance |f(x) - f(G(E(x)))|^2 (bottleneck map), normalised"),
    )

    @classmethod
    def tiny(cls):
        return (
            DCGANArchitecture(latent_dim=32, base_width=8, max_width=32),
            FAnoGANOptions(batch_size=16, gan_iterations=20, encoder_iterations=20, critic_steps=2),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        validate_size("f-AnoGAN", inputs.image_size)

    def __init__(self, architecture: DCGANArchitecture, inputs):
        super().__init__(architecture, inputs)
        shape = Shape(architecture, inputs.image_size, inputs.num_channels)
        self.generator, self.critic, self.encoder = Generator(shape), Critic(shape), Encoder(shape)
        self.eval()

    def networks(self):
        return {"generator": self.generator, "critic": self.critic, "encoder": self.encoder}

    @classmethod
    def stages(cls, options: FAnoGANOptions):
        total = options.gan_iterations * (options.critic_steps + 1) + options.encoder_iterations
        return (
            TrainingStage(
                "gan", "stage 1 WGAN-GP", options.gan_iterations * (options.critic_steps + 1) / total, "gan_iterations"
            ),  # fmt: skip
            TrainingStage("encoder", "stage 2 encoder", options.encoder_iterations / total, "encoder_iterations"),
        )

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        x = self.inputs.channels(x)
        recon = self.generator(self.encoder(x, pos), pos).float()
        fx, fr = self.critic.feature_map(x, pos), self.critic.feature_map(recon.to(x.dtype), pos)
        return residual_maps(x, recon, fx, fr)

    def fit(self, data: TrainingData, options: FAnoGANOptions, run: TrainingRun) -> None:
        gen, device = run.generator, run.device
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=options.learning_rate, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=(0.0, 0.9))
        opt_e = torch.optim.Adam(self.encoder.parameters(), lr=options.learning_rate * 2, betas=(0.5, 0.999))
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d, "opt_encoder": opt_e}
        nets = self.networks()
        run.restore(nets, optimizers)
        gan_stage, encoder_stage = self.stages(options)
        latent = self.architecture.latent_dim

        def batch():
            return sample_slices(data, options.batch_size, self.inputs, gen, options.augment, device)

        def gan_step(step, fraction):
            self.generator.train()
            self.critic.train()
            for _ in range(options.critic_steps):
                x, pos = batch()
                z = (torch.rand(x.shape[0], latent, generator=gen) * 2 - 1).to(device)
                with torch.no_grad():
                    fake = self.generator(z, pos)
                loss_d = self.critic(fake, pos).mean() - self.critic(x, pos).mean()
                penalty = gradient_penalty(partial(self.critic, pos=pos), x, fake, gen)
                loss_d = loss_d + options.gradient_penalty * penalty
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            z = (torch.rand(options.batch_size, latent, generator=gen) * 2 - 1).to(device)
            pos = data.positions[torch.randint(len(data), (options.batch_size,), generator=gen)].float().to(device)
            loss_g = -self.critic(self.generator(z, pos), pos).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            return {"critic_loss": loss_d.item(), "generator_loss": loss_g.item()}

        run.run_stage(gan_stage, options.gan_iterations, gan_step, nets, optimizers)
        try:
            train_izif_encoder(
                run, encoder_stage, options.encoder_iterations, self.encoder, opt_e, (self.generator, self.critic),
                batch, lambda x, pos: self.generator(self.encoder(x, pos), pos), self.critic.features, options.kappa,
                nets, optimizers,
            )  # fmt: skip
        finally:
            self.eval()
