"""GANomaly (Akcay et al. 2018): an encoder-decoder-encoder generator and a critic, on normal slices.

The generator encodes a slice to z = E1(x), decodes it to x' = D(z) and encodes that again, z' = E2(x').
Its loss is feature matching on the critic's feature layer, weighted L1 reconstruction and the latent
consistency ||z - z'||^2; the critic tells slices from reconstructions (binary cross-entropy) and is
re-initialised when it wins outright, as in the reference code. Scoring runs every network in evaluation
mode (the reference code scores in training mode, so batch normalisation adapts to the test batch and
inflates its published AUCs) and calibrates on normal slices like every backend (never min-max over a
test set):

- latent = ||z - z'||^2 / latent size: one value per slice, so a uniform map over the body;
- reconstruction = |x - x'| averaged over the window channels: where on the slice it differs.
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import sample_slices
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .dcgan_networks import Critic, DCGANArchitecture, Encoder, Generator, Shape, validate_size
from .izif import residual_maps

CRITIC_RESET_LOSS = 1e-5


@dataclass
class GANomalyLosses:
    """The loss weights and optimiser of GANomaly (shared with Progressive GANomaly)."""

    learning_rate: float = option(2e-4, "Adam learning rate of generator and critic")
    adversarial_weight: float = option(1.0, "weight of the critic feature-matching term (w_adv)")
    reconstruction_weight: float = option(50.0, "weight of the L1 reconstruction term (w_con)")
    latent_weight: float = option(1.0, "weight of the latent consistency term ||z - z'||^2 (w_enc)")
    augment: bool = option(True, "no rotation/scaling/shift/noise augmentation", flag="--no-augment")

    def validate(self) -> None:
        expect(0 < self.learning_rate <= 1, "learning_rate", "above 0, at most 1", self.learning_rate)
        for name in ("adversarial_weight", "reconstruction_weight", "latent_weight"):
            expect(0 <= getattr(self, name) <= 1e3, name, "0 to 1000", getattr(self, name))


@dataclass
class GANomalyOptions(GANomalyLosses):
    iterations: int = option(3000, "training steps (each: one generator and one critic update)")
    batch_size: int = option(32, "slices per training step")

    def validate(self) -> None:
        super().validate()
        for name in ("iterations", "batch_size"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))


class GANomalyStep:
    """One GANomaly update of generator and critic. Per batch it gets the image channels x and three
    functions of image channels (which add any conditioning themselves): `generate` -> (z, x', z'), the
    critic's `features` and its `logit`."""

    def __init__(self, options: GANomalyLosses, critic: torch.nn.Module, opt_g, opt_d):
        self.options, self.critic, self.opt_g, self.opt_d = options, critic, opt_g, opt_d
        self.initial_critic = {k: v.clone() for k, v in critic.state_dict().items()}

    def __call__(self, x, generate, features, logit) -> Dict[str, float]:
        o = self.options
        z, recon, z2 = generate(x)
        loss_adv = F.mse_loss(features(recon), features(x).detach())
        loss_con = (recon - x).abs().mean()
        loss_enc = F.mse_loss(z2, z)
        loss_g = o.adversarial_weight * loss_adv + o.reconstruction_weight * loss_con + o.latent_weight * loss_enc
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        real, fake = logit(x), logit(recon.detach())
        loss_d = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))  # fmt: skip
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        if loss_d.item() < CRITIC_RESET_LOSS:  # a critic that wins outright gives no gradient: start it again
            self.critic.load_state_dict(self.initial_critic)
        return {"reconstruction_l1": loss_con.item(), "latent": loss_enc.item(), "critic": loss_d.item()}


class GANomalyGenerator(torch.nn.Module):
    """x -> (z, x', z'): encoder E1, decoder D (the DCGAN generator) and encoder E2."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.encoder = Encoder(shape, bounded=False)
        self.decoder = Generator(shape)
        self.reencoder = Encoder(shape, bounded=False)

    def forward(self, x, pos):
        z = self.encoder(x, pos)
        recon = self.decoder(z, pos)
        return z, recon, self.reencoder(recon, pos)


class GANomalyBackend(DetectorBackend):
    name = "ganomaly"
    summary = "GANomaly: encoder-decoder-encoder generator and critic; latent distance ||z - z'|| per slice"
    Architecture = DCGANArchitecture
    Options = GANomalyOptions
    components = (
        ScoreComponent("latent", "latent distance ||z - z'||^2 of the whole slice (uniform over the body), normalised"),
        ScoreComponent("reconstruction", "reconstruction residual |x - x'|, normalised by normal slices", 0.25),
    )

    @classmethod
    def tiny(cls):
        return (
            DCGANArchitecture(latent_dim=32, base_width=8, max_width=32),
            GANomalyOptions(iterations=20, batch_size=16),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        validate_size("GANomaly", inputs.image_size)

    def __init__(self, architecture: DCGANArchitecture, inputs):
        super().__init__(architecture, inputs)
        shape = Shape(architecture, inputs.image_size, inputs.num_channels)
        self.generator, self.critic = GANomalyGenerator(shape), Critic(shape)
        self.eval()

    def networks(self):
        return {"generator": self.generator, "critic": self.critic}

    @classmethod
    def stages(cls, options: GANomalyOptions):
        return (TrainingStage("ganomaly", "GANomaly generator and critic", 1.0, "iterations"),)

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        x = self.inputs.channels(x)
        z, recon, z2 = self.generator(x, pos)
        latent = ((z.float() - z2.float()) ** 2).mean(dim=1).view(-1, 1, 1).expand(-1, *x.shape[-2:])
        return {"latent": latent, **residual_maps(x, recon)}

    def fit(self, data: TrainingData, options: GANomalyOptions, run: TrainingRun) -> None:
        gen, device = run.generator, run.device
        opt_g, opt_d = adam_pair(self.generator, self.critic, options.learning_rate)
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d}
        nets = self.networks()
        run.restore(nets, optimizers)
        update = GANomalyStep(options, self.critic, opt_g, opt_d)

        def step(k, fraction):
            x, pos = sample_slices(data, options.batch_size, self.inputs, gen, options.augment, device)
            self.train_mode()
            return update(
                x,
                lambda v: self.generator(v, pos),
                lambda v: self.critic.features(v, pos),
                lambda v: self.critic(v, pos),
            )

        try:
            run.run_stage(self.stages(options)[0], options.iterations, step, nets, optimizers)
        finally:
            self.eval()


def adam_pair(generator, critic, learning_rate):
    """GANomaly's optimisers: Adam (0.5, 0.999) for generator and critic."""
    return tuple(
        torch.optim.Adam(net.parameters(), lr=learning_rate, betas=(0.5, 0.999)) for net in (generator, critic)
    )
