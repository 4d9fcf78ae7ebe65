"""The detector interface and its f-AnoGAN backend.

Scoring, calibration, heatmaps, bundles and the command line only use `AnomalyDetector`: another
backend (GANomaly-style encoder loss, DeScarGAN healthy translation, ASC-Net selective cutting) plugs in
by implementing it and registering in `BACKENDS`.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig, ScoreConfig
from .errors import CancelledError
from .networks import build_networks


@dataclass
class BatchScores:
    """Per-slice scores and the pixel residual map of one batch (model resolution)."""

    reconstruction: torch.Tensor  # (n,) mean |x - G(E(x))| inside the body
    feature: torch.Tensor  # (n,) mean (f(x) - f(G(E(x))))^2
    residual: torch.Tensor  # (n, S, S) smoothed |x - G(E(x))|, zero outside the body
    reconstruction_image: torch.Tensor  # (n, S, S) G(E(x))


@dataclass
class TrainingOptions:
    batch_size: int = 32
    gan_iterations: int = 2000
    encoder_iterations: int = 1000
    critic_steps: int = 5
    gradient_penalty: float = 10.0
    learning_rate: float = 1e-4
    augment: bool = True
    checkpoint_every: int = 200
    seed: int = 0


ProgressFn = Callable[[str, int, int, Dict[str, float]], None]
CancelFn = Callable[[], bool]


class AnomalyDetector(Protocol):
    """What every backend provides."""

    backend: str
    model_config: ModelConfig

    def networks(self) -> Dict[str, torch.nn.Module]:
        """Named networks whose weights make up the bundle (one safetensors file each)."""

    def score_batch(self, x: torch.Tensor, pos: torch.Tensor, body: torch.Tensor) -> BatchScores:
        """Scores for a batch of preprocessed slices (n, 1, S, S) with positions (n,) and body masks."""

    def fit(self, train, options: TrainingOptions, progress: ProgressFn, cancel: CancelFn, checkpoint, device) -> None:
        """Train on normal slices only."""


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (n, 1, H, W) maps."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = (k.numel() - 1) // 2
    maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts, plus intensity noise (x in [-1, 1])."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * 0.09)  # +-5 degrees
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.1
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.08
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    out = out + torch.randn(out.shape, generator=generator) * 0.01
    return out.clamp(-1, 1)


class FAnoGANDetector:
    """f-AnoGAN: WGAN-GP (stage 1), then izif encoder training with G and D frozen (stage 2)."""

    backend = "fanogan"

    def __init__(self, model_config: ModelConfig, score_config: ScoreConfig):
        self.model_config = model_config
        self.score_config = score_config
        nets = build_networks(model_config)
        self.generator, self.critic, self.encoder = nets["generator"], nets["critic"], nets["encoder"]

    def networks(self) -> Dict[str, torch.nn.Module]:
        return {"generator": self.generator, "critic": self.critic, "encoder": self.encoder}

    def to(self, device: torch.device) -> "FAnoGANDetector":
        for net in self.networks().values():
            net.to(device)
        return self

    @torch.no_grad()
    def score_batch(self, x: torch.Tensor, pos: torch.Tensor, body: torch.Tensor) -> BatchScores:
        recon = self.generator(self.encoder(x, pos), pos).float()
        x = x.float()
        diff = (x - recon).abs()
        inside = body.float()
        n_inside = inside.sum(dim=(1, 2, 3)).clamp_min(1)
        reconstruction = (diff * inside).sum(dim=(1, 2, 3)) / n_inside
        fx = self.critic.features(x, pos).float()
        fr = self.critic.features(recon.to(x.dtype), pos).float()
        feature = ((fx - fr) ** 2).mean(dim=1)
        residual = smooth(diff, self.score_config.heatmap_sigma_px) * inside
        return BatchScores(reconstruction, feature, residual[:, 0], recon[:, 0])

    # ---- training -------------------------------------------------------------------------------

    def fit(
        self,
        train,
        options: TrainingOptions,
        progress: ProgressFn,
        cancel: CancelFn,
        checkpoint,
        device="cpu",
    ):
        """Train on `train` (`SliceSet`); `checkpoint` saves/restores state (see training.Checkpointer).
        Random numbers come from one CPU generator, so a run is repeatable and resumable."""
        gen = torch.Generator().manual_seed(options.seed)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=options.learning_rate, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=options.learning_rate, betas=(0.0, 0.9))
        opt_e = torch.optim.Adam(self.encoder.parameters(), lr=options.learning_rate * 2, betas=(0.5, 0.999))
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d, "opt_encoder": opt_e}
        state = checkpoint.restore(self.networks(), optimizers, gen)
        stage, step = state.get("stage", "gan"), int(state.get("step", 0))
        latent = self.model_config.latent_dim

        def batch():
            idx = torch.randint(len(train), (options.batch_size,), generator=gen)
            x, pos = train.images[idx].float(), train.positions[idx].float()
            return (augment_batch(x, gen) if options.augment else x).to(device), pos.to(device)

        if stage == "gan":
            self.generator.train()
            self.critic.train()
            while step < options.gan_iterations:
                for _ in range(options.critic_steps):
                    x, pos = batch()
                    z = (torch.rand(x.shape[0], latent, generator=gen) * 2 - 1).to(device)
                    with torch.no_grad():
                        fake = self.generator(z, pos)
                    loss_d = self.critic(fake, pos).mean() - self.critic(x, pos).mean()
                    loss_d = loss_d + options.gradient_penalty * self._gradient_penalty(x, fake, pos, gen)
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                z = (torch.rand(options.batch_size, latent, generator=gen) * 2 - 1).to(device)
                pos = train.positions[torch.randint(len(train), (options.batch_size,), generator=gen)].float()
                pos = pos.to(device)
                loss_g = -self.critic(self.generator(z, pos), pos).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                step += 1
                progress(
                    "gan",
                    step,
                    options.gan_iterations,
                    {"critic_loss": loss_d.item(), "generator_loss": loss_g.item()},
                )
                self._maybe_checkpoint(checkpoint, options, "gan", step, optimizers, gen, cancel)
            stage, step = "encoder", 0
            checkpoint.save(self.networks(), optimizers, gen, {"stage": stage, "step": step})

        self.generator.eval()
        self.critic.eval()
        for p in list(self.generator.parameters()) + list(self.critic.parameters()):
            p.requires_grad_(False)
        self.encoder.train()
        kappa = self.score_config.kappa
        while step < options.encoder_iterations:
            x, pos = batch()
            recon = self.generator(self.encoder(x, pos), pos)
            loss_img = F.mse_loss(recon, x)
            loss_feat = F.mse_loss(self.critic.features(recon, pos), self.critic.features(x, pos))
            loss_e = loss_img + kappa * loss_feat
            opt_e.zero_grad(set_to_none=True)
            loss_e.backward()
            opt_e.step()
            step += 1
            progress(
                "encoder",
                step,
                options.encoder_iterations,
                {"image_loss": loss_img.item(), "feature_loss": loss_feat.item()},
            )
            self._maybe_checkpoint(checkpoint, options, "encoder", step, optimizers, gen, cancel)
        for net in self.networks().values():
            net.eval()
            for p in net.parameters():
                p.requires_grad_(True)

    def _maybe_checkpoint(self, checkpoint, options, stage, step, optimizers, gen, cancel):
        cancelled = cancel()
        if cancelled or step % options.checkpoint_every == 0:
            checkpoint.save(self.networks(), optimizers, gen, {"stage": stage, "step": step})
        if cancelled:
            raise CancelledError(f"training cancelled at {stage} step {step}; resume with --resume")

    def _gradient_penalty(self, real, fake, pos, gen):
        eps = torch.rand(real.shape[0], 1, 1, 1, generator=gen).to(real.device)
        mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
        out = self.critic(mixed, pos)
        (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


BACKENDS = {FAnoGANDetector.backend: FAnoGANDetector}


def create_detector(backend: str, model_config: ModelConfig, score_config: ScoreConfig) -> AnomalyDetector:
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown detector backend '{backend}'; known: {', '.join(sorted(BACKENDS))}") from None
    return cls(model_config, score_config)
