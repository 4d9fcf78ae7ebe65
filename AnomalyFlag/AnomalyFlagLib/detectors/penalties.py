"""Regularisers of GAN critics shared by the backends."""

from typing import Callable

import torch


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real, fake, generator: torch.Generator):
    """WGAN-GP (Gulrajani et al. 2017): (||grad critic(mixed)|| - 1)^2 at random mixtures of real and fake
    slices; `critic(x)` returns one score per slice."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator).to(real)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
