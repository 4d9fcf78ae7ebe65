"""Model and preprocessing configuration, stored verbatim in a bundle's metadata.json."""

from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import BundleError


@dataclass
class ModelConfig:
    """Architecture of the f-AnoGAN networks (generator, critic, encoder)."""

    image_size: int = 128
    latent_dim: int = 128
    base_width: int = 16
    max_width: int = 128
    condition_on_position: bool = True

    def validate(self) -> None:
        size = self.image_size
        if size < 64 or size > 512 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two from 64 to 512, not {size}")
        if self.latent_dim < 2 or self.base_width < 1 or self.max_width < self.base_width:
            raise ValueError("latent_dim >= 2 and 1 <= base_width <= max_width are required")

    @property
    def num_levels(self) -> int:
        """Stride-2 stages between image_size and the 4x4 bottleneck."""
        return (self.image_size // 4).bit_length() - 1

    def widths(self):
        """Channel width at each level, from full resolution down to 4x4."""
        return [min(self.base_width * 2**level, self.max_width) for level in range(self.num_levels)]


@dataclass
class PreprocessConfig:
    """How a slice becomes a network input: intensity window, field of view and orientation.

    Slices are taken along the volume's axis closest to superior-inferior and turned so that rows run
    anterior->posterior and columns right->left (radiological display), then resampled to a square
    field of view of `fov_mm` centred on the slice centre (MRI: `fov_mm` None uses the whole slice).
    """

    window_min: float = -1000.0
    window_max: float = 1000.0
    fov_mm: Optional[float] = 400.0
    body_threshold: float = -500.0
    modality: str = "CT"


@dataclass
class ScoreConfig:
    """Combination of the two f-AnoGAN scores and the heatmap post-processing."""

    kappa: float = 1.0
    heatmap_sigma_px: float = 1.5
    position_bins: int = 5
    target_false_flag_rate: float = 0.05
    pixel_false_positive_rate: float = 0.005


def config_from_dict(cls, data: dict, where: str):
    """Build a config dataclass from metadata, refusing unknown keys (a newer or foreign bundle)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BundleError(f"{where}: unknown {cls.__name__} fields {unknown}; the bundle is from another version.")
    return cls(**data)


def config_to_dict(config) -> dict:
    return asdict(config)
