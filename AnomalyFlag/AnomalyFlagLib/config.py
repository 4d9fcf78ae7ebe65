"""Backend-neutral configuration, stored verbatim in a bundle's metadata.json.

Each backend keeps its own architecture and training-option dataclasses (see `detectors`); the two
here describe what every backend shares: how a slice becomes a network input, and how pixel maps
become calibrated slice scores.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from .errors import BundleError

CT_WINDOWS = [[-160.0, 240.0], [-1000.0, 1000.0], [1000.0, 3000.0]]
"""Soft tissue (a 30 HU lesion moves this channel by 0.15), wide (air, fat, bone) and metal (above bone)."""
MR_WINDOWS = [[0.0, 1.0]]
"""The volume's 1st..99th percentile range."""
MODALITIES = ("CT", "MR")


@dataclass
class PreprocessConfig:
    """How a slice becomes a network input: intensity windows, field of view, size and orientation.

    Slices are taken along the volume's axis closest to superior-inferior and turned so that rows run
    anterior->posterior and columns right->left (radiological display), resampled to pixels of
    fov_mm / image_size, and the image_size square centred on the body is cut out (fov_mm None uses the
    whole slice). CT intensities are HU; MRI intensities are mapped per volume so that the
    `mr_percentiles` percentiles become 0 and 1. Each window [low, high] becomes one input channel.
    """

    modality: str = "CT"
    windows: List[List[float]] = field(default_factory=lambda: [list(w) for w in CT_WINDOWS])
    image_size: int = 192
    fov_mm: Optional[float] = 384.0
    body_threshold: float = -500.0
    centre_on_body: bool = True
    mr_percentiles: List[float] = field(default_factory=lambda: [1.0, 99.0])

    @classmethod
    def for_modality(cls, modality: str, windows=None, **kwargs) -> "PreprocessConfig":
        """Defaults for CT or MR (windows and body threshold in that modality's units); `windows` None
        keeps the modality's default windows."""
        modality = modality.upper()
        if modality == "MR":
            windows = windows or [list(w) for w in MR_WINDOWS]
            kwargs.setdefault("body_threshold", 0.1)
        if windows:
            kwargs["windows"] = [list(w) for w in windows]
        return cls(modality=modality, **kwargs)

    def validate(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not '{self.modality}'")
        if not self.windows or any(len(w) != 2 or not w[1] > w[0] for w in self.windows):
            raise ValueError(f"windows must be [low, high] pairs with high > low, not {self.windows}")
        if self.image_size < 32 or self.image_size > 512 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 from 32 to 512, not {self.image_size}")
        if self.fov_mm is not None and not self.fov_mm > 0:
            raise ValueError(f"fov_mm must be positive (or None for the whole slice), not {self.fov_mm}")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, not {self.mr_percentiles}")


@dataclass
class ScoreConfig:
    """How pixel maps become a heatmap and a calibrated slice score (the same for every backend).

    Each component map is normalised per pixel by held-out normal statistics in `position_bins` bins of
    slice position (robust scale floored at `pixel_floor` times the component's overall scale), the
    weighted normalised maps are summed and smoothed by `map_sigma_mm`; the slice score is the mean of
    the top `score_area_mm2` of that map inside the body. A slice then takes the highest score within
    `neighbour_slices` slices of it (anomalies are 3D), is normalised by normal median and MAD per
    position bin and flagged above the quantile that flags `target_false_flag_rate` of normal slices.
    """

    position_bins: int = 4
    pixel_floor: float = 2.0
    neighbour_slices: int = 1
    map_sigma_mm: float = 2.0
    score_area_mm2: float = 50.0
    target_false_flag_rate: float = 0.05
    pixel_false_positive_rate: float = 0.005

    def validate(self) -> None:
        if not 0 < self.target_false_flag_rate < 0.5:
            raise ValueError(f"target false-flag rate must be between 0 and 0.5, not {self.target_false_flag_rate}")
        if not 0 < self.pixel_false_positive_rate < 0.5:
            raise ValueError(
                f"pixel false-positive rate must be between 0 and 0.5, not {self.pixel_false_positive_rate}"
            )
        if self.position_bins < 1 or self.pixel_floor <= 0 or self.score_area_mm2 <= 0 or self.map_sigma_mm < 0:
            raise ValueError(
                "position_bins >= 1, pixel_floor > 0, score_area_mm2 > 0 and map_sigma_mm >= 0 are required"
            )


def config_from_dict(cls, data: dict, where: str):
    """Build a config dataclass from metadata, refusing unknown keys (a newer or foreign bundle)."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: {cls.__name__} is not a JSON object.")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BundleError(f"{where}: unknown {cls.__name__} fields {unknown}; the bundle is from another version.")
    return cls(**data)


def config_to_dict(config) -> dict:
    return asdict(config)
