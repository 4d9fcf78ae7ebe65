"""Training batches shared by the backends: random slices, their body masks, and geometric and noise
augmentation."""

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, generator: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """Small random rotations (+-5 degrees), scalings (+-5%) and shifts, plus intensity noise, of windowed
    (n, C, H, W) slices in [-1, 1]; what moves in from outside is air (-1)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * 0.09)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.1
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.08
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    out = out + torch.randn(out.shape, generator=generator).to(x) * noise
    return out.clamp(-1, 1)


def sample_slices(data, n: int, inputs, generator: torch.Generator, augment: bool, device):
    """`n` random slices of `data` (a TrainingData), windowed by `inputs` (an InputSpec) and augmented
    when `augment`, and their positions, both on `device`."""
    idx = torch.randint(len(data), (n,), generator=generator)
    x = inputs.channels(data.images[idx])
    if augment:
        x = augment_batch(x, generator)
    return x.to(device), data.positions[idx].float().to(device)


def body_masks(data, inputs) -> torch.Tensor:
    """The body mask of every slice of `data` (a TrainingData), computed 256 slices at a time."""
    return torch.cat([inputs.body(data.images[k : k + 256].float()) for k in range(0, len(data), 256)])
