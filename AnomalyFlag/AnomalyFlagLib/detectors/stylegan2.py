"""StyleGAN2 with an encoder: a style-based GAN on normal slices, conditioned on the slice position through
its mapping network, then an izif encoder into its W or W+ space with generator and critic frozen.

Stage 1 trains generator and critic with the non-saturating logistic loss, lazy R1 regularisation of
the critic and, optionally, the lazy path-length penalty of the generator; the running mean of w is kept
for the encoder to start from. Stage 2 is f-AnoGAN's izif stage. Scores, as f-AnoGAN's:

- reconstruction R = |x - G(E(x))|, averaged over the window channels;
- feature F = |f(x) - f(G(E(x)))|^2 on the critic's 1/8-resolution feature map, upsampled.

The intended configuration is 512 px on CUDA; on a CPU train a small one (see the README for costs).
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import sample_slices
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .dcgan_networks import Shape, validate_size
from .izif import residual_maps, train_izif_encoder
from .stylegan2_networks import ResidualCritic, StyleEncoder, StyleGAN2Architecture, StyleGenerator

W_AVG_DECAY = 0.995
PATH_LENGTH_DECAY = 0.01


@dataclass
class StyleGAN2Options:
    batch_size: int = option(8, "slices per training step (a GPU: 32)")
    gan_iterations: int = option(2000, "stage 1 (StyleGAN2) steps, each one critic and one generator update")
    encoder_iterations: int = option(1000, "stage 2 (izif encoder) steps")
    learning_rate: float = option(2e-3, "Adam learning rate of generator and critic (the encoder uses 1e-4)")
    r1_gamma: float = option(1.0, "R1 regularisation weight of the critic (0: off)")
    r1_interval: int = option(16, "apply R1 every this many steps (lazy regularisation)")
    path_length_weight: float = option(0.0, "path-length penalty weight of the generator (StyleGAN2: 2; 0: off)")
    path_length_interval: int = option(4, "apply the path-length penalty every this many steps")
    kappa: float = option(1.0, "weight of the feature term in the encoder loss")
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        for name in ("batch_size", "gan_iterations", "encoder_iterations", "r1_interval", "path_length_interval"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("r1_gamma", "path_length_weight", "kappa"):
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))


class StyleGAN2Backend(DetectorBackend):
    name = "stylegan2"
    summary = "StyleGAN2: style-based generator conditioned on the slice position, then an izif encoder into W/W+"
    Architecture = StyleGAN2Architecture
    Options = StyleGAN2Options
    components = (
        ScoreComponent("reconstruction", "residual |x - G(E(x))|, normalised by normal slices"),
        ScoreComponent("feature", "critic feature distance |f(x) - f(G(E(x)))|^2 (1/8-resolution map), normalised"),
    )

    @classmethod
    def tiny(cls):
        return (
            StyleGAN2Architecture(latent_dim=32, mapping_layers=2, base_width=8, max_width=32),
            StyleGAN2Options(
                batch_size=8,
                gan_iterations=12,
                encoder_iterations=12,
                r1_interval=4,
                path_length_weight=1.0,
                path_length_interval=4,
            ),  # fmt: skip
        )

    @classmethod
    def validate(cls, architecture, inputs):
        validate_size("StyleGAN2", inputs.image_size)

    def __init__(self, architecture: StyleGAN2Architecture, inputs):
        super().__init__(architecture, inputs)
        shape = Shape(architecture, inputs.image_size, inputs.num_channels)
        self.generator = StyleGenerator(architecture, shape)
        self.critic = ResidualCritic(architecture, shape)
        self.encoder = StyleEncoder(architecture, shape, self.generator.synthesis.num_ws)
        self.eval()

    def networks(self):
        return {"generator": self.generator, "critic": self.critic, "encoder": self.encoder}

    @classmethod
    def stages(cls, options: StyleGAN2Options):
        # A generator step costs about two critic steps' worth; the izif step about one.
        total = 3 * options.gan_iterations + options.encoder_iterations
        return (
            TrainingStage("gan", "stage 1 StyleGAN2", 3 * options.gan_iterations / total, "gan_iterations"),
            TrainingStage("encoder", "stage 2 encoder", options.encoder_iterations / total, "encoder_iterations"),
        )

    def _reconstruct(self, x, pos):
        return self.generator.synthesis(self.encoder(x, pos, self.generator.mapping.w_avg))

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        x = self.inputs.channels(x)
        recon = self._reconstruct(x, pos).float()
        fx, fr = self.critic.feature_map(x, pos), self.critic.feature_map(recon.to(x.dtype), pos)
        return residual_maps(x, recon, fx, fr)

    def fit(self, data: TrainingData, options: StyleGAN2Options, run: TrainingRun) -> None:
        gen, device = run.generator, run.device
        betas = (0.0, 0.99)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=options.learning_rate, betas=betas)
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=betas)
        opt_e = torch.optim.Adam(self.encoder.parameters(), lr=1e-4, betas=(0.9, 0.999))
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d, "opt_encoder": opt_e}
        nets = self.networks()
        run.restore(nets, optimizers)
        gan_stage, encoder_stage = self.stages(options)
        mapping, latent = self.generator.mapping, self.architecture.latent_dim

        def batch():
            return sample_slices(data, options.batch_size, self.inputs, gen, options.augment, device)

        def fake(pos):
            z = torch.randn(pos.shape[0], latent, generator=gen).to(device)
            ws = self.generator.styles(z, pos)
            return self.generator.synthesis(ws, gen), ws

        def gan_step(step, fraction):
            self.generator.train()
            self.critic.train()
            x, pos = batch()
            with torch.no_grad():
                image, _ = fake(pos)
            loss_d = F.softplus(self.critic(image, pos)).mean() + F.softplus(-self.critic(x, pos)).mean()
            if options.r1_gamma > 0 and step % options.r1_interval == 0:
                real = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.critic(real, pos).sum(), real, create_graph=True)
                r1 = grad.pow(2).flatten(1).sum(dim=1).mean()
                loss_d = loss_d + options.r1_gamma / 2 * r1 * options.r1_interval
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            image, ws = fake(pos)
            loss_g = F.softplus(-self.critic(image, pos)).mean()
            if options.path_length_weight > 0 and step % options.path_length_interval == 0:
                noise = torch.randn(image.shape, generator=gen).to(image) / image.shape[-1]
                (grad,) = torch.autograd.grad((image * noise).sum(), ws, create_graph=True)
                lengths = grad.pow(2).sum(dim=2).mean(dim=1).sqrt()
                path_mean = self.generator.path_length_mean
                path_mean.lerp_(lengths.mean().detach(), PATH_LENGTH_DECAY)
                penalty = (lengths - path_mean).pow(2).mean()
                loss_g = loss_g + options.path_length_weight * penalty * options.path_length_interval
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            with torch.no_grad():
                mapping.w_avg.lerp_(ws[:, 0].mean(dim=0), 1 - W_AVG_DECAY)
            return {"critic_loss": loss_d.item(), "generator_loss": loss_g.item()}

        run.run_stage(gan_stage, options.gan_iterations, gan_step, nets, optimizers)
        try:
            train_izif_encoder(
                run, encoder_stage, options.encoder_iterations, self.encoder, opt_e, (self.generator, self.critic),
                batch, self._reconstruct, self.critic.features, options.kappa, nets, optimizers,
            )  # fmt: skip
        finally:
            self.eval()
