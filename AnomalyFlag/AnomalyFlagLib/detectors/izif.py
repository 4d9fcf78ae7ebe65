"""What the latent-code detectors share: the izif encoder stage (Schlegl et al. 2019; f-AnoGAN and
StyleGAN2), and the residual maps that every reconstructing backend scores with."""

from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import TrainingRun, TrainingStage


def residual_maps(x, recon, fx=None, fr=None) -> Dict[str, torch.Tensor]:
    """`reconstruction` |x - recon| (mean over the window channels) and, given the critic's feature maps
    of both, `feature` |f(x) - f(recon)|^2 (mean over the feature channels, upsampled to the slice)."""
    maps = {"reconstruction": (x.float() - recon.float()).abs().mean(dim=1)}
    if fx is not None:
        distance = ((fx.float() - fr.float()) ** 2).mean(dim=1, keepdim=True)
        maps["feature"] = F.interpolate(distance, size=x.shape[-2:], mode="bilinear")[:, 0]
    return maps


def train_izif_encoder(
    run: TrainingRun,
    stage: TrainingStage,
    steps: int,
    encoder: nn.Module,
    optimizer: torch.optim.Optimizer,
    frozen: Sequence[nn.Module],
    batch: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
    reconstruct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    kappa: float,
    networks: Dict[str, nn.Module],
    optimizers: Dict[str, torch.optim.Optimizer],
) -> None:
    """Train `encoder` so that reconstruct(x, pos) = G(E(x)) matches x in pixels and in the critic's
    features (izif), with the trained generator and critic (`frozen`) held fixed in evaluation mode."""

    def step(k, fraction):
        x, pos = batch()
        recon = reconstruct(x, pos)
        loss_img = F.mse_loss(recon, x)
        loss_feat = F.mse_loss(features(recon, pos), features(x, pos))
        optimizer.zero_grad(set_to_none=True)
        (loss_img + kappa * loss_feat).backward()
        optimizer.step()
        return {"image_loss": loss_img.item(), "feature_loss": loss_feat.item()}

    parameters = [p for net in frozen for p in net.parameters()]
    for net in frozen:
        net.eval()
    for p in parameters:
        p.requires_grad_(False)
    encoder.train()
    try:
        run.run_stage(stage, steps, step, networks, optimizers)
    finally:
        for p in parameters:
            p.requires_grad_(True)
