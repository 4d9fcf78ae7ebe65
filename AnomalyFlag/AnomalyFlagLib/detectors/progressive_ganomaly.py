"""Progressive GANomaly (Madzia-Madzou & Kuijf 2022): GANomaly on patches of normal slices, with networks
that grow in resolution, and a patch-wise anomaly map.

Training takes random patches (`patch_size` pixels, centred in the body) of normal slices. Stage `base`
trains at `start_size` (the patch average-pooled down to it); stage `grow` doubles the resolution up to
`patch_size`, fading each new resolution in over the first half of its steps. Losses are GANomaly's.

Scoring slides the patch networks over the slice with stride `patch_stride`, all patches of a batch of
slices in one batched pass, and reassembles the per-patch values into maps (each pixel: the mean over
the patches that cover it):

- latent = the patches' latent distance ||z - z'||^2 / latent size;
- reconstruction = |x - x'| of the patches' reconstructions.
"""

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import expect
from .augment import augment_batch, body_masks
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun, TrainingStage, option
from .ganomaly import GANomalyLosses, GANomalyStep, adam_pair
from .progressive_ganomaly_networks import PatchDecoder, PatchEncoder, resolutions
from .restoration_networks import conditioning

CONDITION_CHANNELS = 3  # position plane, y and x coordinates
PATCHES_PER_CALL = 4096  # patches per network call when scoring (bounds memory, not the number of calls)


@dataclass
class ProgressiveGANomalyArchitecture:
    patch_size: int = option(32, "side of the patches in pixels (a power of two, 8 to 64)")
    start_size: int = option(16, "resolution the networks start at before growing (a power of two, 4 to patch size)")
    latent_dim: int = option(64, "size of the latent space")
    base_width: int = option(8, "fewest channels of any layer (at the patch resolution)")
    max_width: int = option(32, "channels at 4x4 (halving as the resolution doubles)")
    patch_stride: int = option(4, "stride in pixels of the scoring patch grid")
    condition_on_position: bool = option(True, "do not condition on the slice position", flag="--no-position")

    def validate(self) -> None:
        powers = [2**k for k in range(2, 7)]
        expect(self.patch_size in powers[1:], "patch_size", "8, 16, 32 or 64", self.patch_size)
        expect(self.start_size in powers and self.start_size <= self.patch_size, "start_size",
               f"a power of two from 4 to patch_size ({self.patch_size})", self.start_size)  # fmt: skip
        expect(1 <= self.patch_stride <= self.patch_size, "patch_stride", f"1 to patch_size ({self.patch_size})",
               self.patch_stride)  # fmt: skip
        expect(2 <= self.latent_dim <= 1024, "latent_dim", "2 to 1024", self.latent_dim)
        expect(1 <= self.base_width <= self.max_width <= 1024, "base_width and max_width",
               "1 <= base_width <= max_width <= 1024", (self.base_width, self.max_width))  # fmt: skip


@dataclass
class ProgressiveGANomalyOptions(GANomalyLosses):
    base_iterations: int = option(1500, "steps at the start resolution")
    grow_iterations: int = option(3000, "steps while growing to the patch size (shared by the new resolutions)")
    batch_size: int = option(64, "patches per training step")

    def validate(self) -> None:
        super().validate()
        for name in ("base_iterations", "grow_iterations", "batch_size"):
            expect(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))


class PatchGANomaly(torch.nn.Module):
    """Encoder E1, decoder and encoder E2 on patches with their conditioning planes."""

    def __init__(self, arch: ProgressiveGANomalyArchitecture, channels: int):
        super().__init__()
        sizes = (arch.start_size, arch.patch_size, arch.base_width, arch.max_width, arch.latent_dim)
        self.encoder = PatchEncoder(channels + CONDITION_CHANNELS, *sizes)
        self.decoder = PatchDecoder(channels, CONDITION_CHANNELS, *sizes)
        self.reencoder = PatchEncoder(channels + CONDITION_CHANNELS, *sizes)

    def forward(self, x, cond, alpha: float = 1.0):
        z = self.encoder(torch.cat([x, cond], dim=1), alpha)
        recon = self.decoder(z, cond, alpha)
        return z, recon, self.reencoder(torch.cat([recon, cond], dim=1), alpha)


class ProgressiveGANomalyBackend(DetectorBackend):
    name = "progressive-ganomaly"
    summary = "Progressive GANomaly: growing patch GANomaly, patch latent distances slid over the slice"
    Architecture = ProgressiveGANomalyArchitecture
    Options = ProgressiveGANomalyOptions
    components = (
        ScoreComponent("latent", "patch latent distance ||z - z'||^2, mean over the covering patches, normalised"),
        ScoreComponent("reconstruction", "patch reconstruction residual |x - x'|, normalised", 0.25),
    )

    @classmethod
    def tiny(cls):
        return (
            ProgressiveGANomalyArchitecture(
                patch_size=16, start_size=8, latent_dim=16, base_width=8, max_width=32, patch_stride=8
            ),  # fmt: skip
            ProgressiveGANomalyOptions(base_iterations=10, grow_iterations=10, batch_size=16),
        )

    @classmethod
    def validate(cls, architecture, inputs):
        a, size = architecture, inputs.image_size
        expect(a.patch_size <= size, "patch_size", f"at most the image size {size}", a.patch_size)
        expect((size - a.patch_size) % a.patch_stride == 0, "patch_stride",
               f"a stride that steps from one edge of the {size}-pixel slice to the other", a.patch_stride)  # fmt: skip

    def __init__(self, architecture: ProgressiveGANomalyArchitecture, inputs):
        super().__init__(architecture, inputs)
        self.generator = PatchGANomaly(architecture, inputs.num_channels)
        a = architecture
        self.critic = PatchEncoder(inputs.num_channels + CONDITION_CHANNELS, a.start_size, a.patch_size,
                                   a.base_width, a.max_width, 1)  # fmt: skip
        self.eval()

    def networks(self):
        return {"generator": self.generator, "critic": self.critic}

    @classmethod
    def stages(cls, options: ProgressiveGANomalyOptions):
        total = options.base_iterations + options.grow_iterations
        return (
            TrainingStage("base", "patch GANomaly at the start resolution", options.base_iterations / total,
                          "base_iterations"),
            TrainingStage("grow", "growing to the patch size", options.grow_iterations / total, "grow_iterations"),
        )  # fmt: skip

    def _condition(self, n, height, width, pos, top=None, left=None):
        return conditioning(n, height, width, pos, top, left, self.inputs.image_size,
                            self.architecture.condition_on_position)  # fmt: skip

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        xw = self.inputs.channels(x)
        n, c, size, _ = xw.shape
        p, stride = self.architecture.patch_size, self.architecture.patch_stride
        planes = torch.cat([xw, self._condition(n, size, size, pos.to(xw.device)).to(xw.dtype)], dim=1)
        columns = F.unfold(planes, p, stride=stride)  # (n, (c + 3) p p, L)
        count = columns.shape[-1]
        patches = columns.transpose(1, 2).reshape(n * count, c + CONDITION_CHANNELS, p, p)
        latent, residual = [], []
        for part in patches.split(PATCHES_PER_CALL):
            image, cond = part[:, :c], part[:, c:]
            z, recon, z2 = self.generator(image, cond)
            latent.append(((z.float() - z2.float()) ** 2).mean(dim=1))
            residual.append((image.float() - recon.float()).abs().mean(dim=1))
        latent = torch.cat(latent).view(n, 1, count).expand(n, p * p, count)
        residual = torch.cat(residual).view(n, count, p * p).transpose(1, 2)

        def assemble(columns):  # each pixel: the mean over the patches that cover it
            total = F.fold(columns, (size, size), p, stride=stride)
            cover = F.fold(torch.ones_like(columns[:1]), (size, size), p, stride=stride)
            return (total / cover)[:, 0]

        return {"latent": assemble(latent), "reconstruction": assemble(residual)}

    def fit(self, data: TrainingData, options: ProgressiveGANomalyOptions, run: TrainingRun) -> None:
        gen, device, spec, arch = run.generator, run.device, self.inputs, self.architecture
        size, p = spec.image_size, arch.patch_size
        opt_g, opt_d = adam_pair(self.generator, self.critic, options.learning_rate)
        optimizers = {"opt_generator": opt_g, "opt_critic": opt_d}
        nets = self.networks()
        run.restore(nets, optimizers)
        update = GANomalyStep(options, self.critic, opt_g, opt_d)
        # Patch centres are drawn inside the body (a little weight everywhere, so an empty slice still has some).
        bodies = body_masks(data, spec)
        weights = bodies.flatten(1).float() + 1e-3
        growth = resolutions(arch.start_size, p)[1:]

        def patch_step(resolution: int, alpha: float):
            idx = torch.randint(len(data), (options.batch_size,), generator=gen)
            centre = torch.multinomial(weights[idx], 1, generator=gen)[:, 0]
            top = (centre // size - p // 2).clamp(0, size - p).tolist()
            left = (centre % size - p // 2).clamp(0, size - p).tolist()
            x = torch.stack([data.images[i, :, t : t + p, q : q + p] for i, t, q in zip(idx.tolist(), top, left)])
            x = spec.channels(x.float())
            if options.augment:
                x = augment_batch(x, gen)
            cond = self._condition(len(idx), p, p, data.positions[idx].float(), top, left)
            if resolution < p:
                x, cond = F.avg_pool2d(x, p // resolution), F.avg_pool2d(cond, p // resolution)
            x, cond = x.to(device), cond.to(device)
            self.train_mode()
            critic = self.critic
            return update(
                x,
                lambda v: self.generator(v, cond, alpha),
                lambda v: critic.features(torch.cat([v, cond], dim=1), alpha),
                lambda v: critic(torch.cat([v, cond], dim=1), alpha)[:, 0],
            )

        def grow_step(k, fraction):
            if not growth:
                return patch_step(p, 1.0)
            where = fraction * len(growth)
            level = min(int(where), len(growth) - 1)
            return patch_step(growth[level], min(1.0, 2 * (where - level)))  # fade in over the first half

        base, grow = self.stages(options)
        try:
            run.run_stage(base, options.base_iterations, lambda k, fraction: patch_step(arch.start_size, 1.0),
                          nets, optimizers)  # fmt: skip
            run.run_stage(grow, options.grow_iterations, grow_step, nets, optimizers)
        finally:
            self.eval()
