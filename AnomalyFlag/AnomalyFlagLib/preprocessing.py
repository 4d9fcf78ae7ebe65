"""Slices to network inputs and network maps back to the slice grid.

A slice is resampled to the model's pixel size (fov_mm / image_size) with MONAI's Resize, and the
image_size square centred on the body (its centroid, or the slice centre when body centring is off) is
cut from it, padded with air where the slice is smaller: the same anatomy lands on the same model
pixels whatever the patient's position on the table, which per-pixel normal statistics rely on.

Intensities stay in the modality's units: HU for CT; for MRI the volume's own percentile range mapped
to 0..1 (`volume_reference`). `InputSpec.channels` applies the intensity windows the networks see, so
training can corrupt slices in real units before windowing.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Resize

from .config import PreprocessConfig
from .errors import InputError

AIR_HU = -1024.0
MAX_SCALE = 8


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


@dataclass(frozen=True)
class InputSpec:
    """What a backend needs to know about its input: the windows (one channel each), the image size,
    the model pixel size and the intensity level above which a pixel is inside the body."""

    windows: Tuple[Tuple[float, float], ...]
    image_size: int
    pixel_mm: Optional[float]
    body_level: float
    pad_value: float

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> "InputSpec":
        pixel = config.fov_mm / config.image_size if config.fov_mm else None
        windows = tuple((float(lo), float(hi)) for lo, hi in config.windows)
        pad = AIR_HU if config.modality == "CT" else 0.0
        return cls(windows, int(config.image_size), pixel, float(config.body_threshold), pad)

    @property
    def num_channels(self) -> int:
        return len(self.windows)

    @property
    def intensity_unit(self) -> float:
        """Half the width of the first (most sensitive) window: a change of one unit moves its channel by 1."""
        lo, hi = self.windows[0]
        return (hi - lo) / 2.0

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, S, S) raw intensities -> (n, C, S, S) windows mapped to [-1, 1] (clipped)."""
        x = x.float()
        return torch.cat([((x - lo) * (2.0 / (hi - lo)) - 1.0).clamp(-1.0, 1.0) for lo, hi in self.windows], dim=1)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Inside-the-body pixels of (n, 1, H, W) raw slices (see `body_mask`)."""
        return body_mask(x, self.body_level)


@dataclass
class Placement:
    """Where each model-input square sits in its slice resampled to the model pixel size."""

    scaled_shape: Tuple[int, int]
    tops: List[int]
    lefts: List[int]


class SlicePreprocessor:
    """Resampling, body centring and MRI intensity normalisation of axial slices."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.spec = InputSpec.from_config(config)
        self.size = config.image_size

    def scaled_shape(self, rows: int, columns: int, row_spacing: float, column_spacing: float) -> Tuple[int, int]:
        """Size of the slice once resampled to the model's pixel size (fov_mm / image_size)."""
        if not self.config.fov_mm:
            return self.size, self.size
        pixel = self.config.fov_mm / self.size
        return max(1, round(rows * row_spacing / pixel)), max(1, round(columns * column_spacing / pixel))

    def check_fits(self, rows: int, columns: int, row_spacing: float, column_spacing: float, name: str) -> None:
        """Refuse slices that would resample to more than MAX_SCALE times the model's field of view per
        side: far larger than the anatomy the model was made for, and a memory blow-up."""
        shape = self.scaled_shape(rows, columns, row_spacing, column_spacing)
        if max(shape) > MAX_SCALE * self.size:
            raise InputError(
                f"{name} has slices of {rows * row_spacing:.0f} x {columns * column_spacing:.0f} mm, more than "
                f"{MAX_SCALE} times the model's field of view ({self.config.fov_mm:g} mm); at the model's pixel "
                f"size each would be {shape[0]} x {shape[1]} pixels. Is this the scan the model was made for?"
            )

    def to_model(
        self,
        slab: np.ndarray,
        row_spacing: float,
        column_spacing: float,
        reference: Optional[Tuple[float, float]] = None,
    ) -> Tuple[torch.Tensor, Placement]:
        """(n, rows, columns) intensities -> (n, 1, S, S) float32 in model units, and where each square sits.

        `reference` is the MRI volume's (low, high) percentile pair from `volume_reference`."""
        x = torch.from_numpy(np.array(slab, dtype=np.float32, order="C"))
        if self.config.modality == "MR":
            if reference is None:
                raise ValueError("MRI slices need the volume's intensity reference (volume_reference)")
            lo, hi = reference
            x = (x - lo) / max(hi - lo, 1e-6)
        shape = self.scaled_shape(slab.shape[1], slab.shape[2], row_spacing, column_spacing)
        if shape != tuple(x.shape[1:]):
            mode = "area" if shape[0] < x.shape[1] else "bilinear"
            x = _plain(Resize(shape, mode=mode)(x))
        tops, lefts = self._corners(x)
        s = self.size
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.spec.pad_value)
        out = torch.stack(
            [padded[i, t + s : t + 2 * s, c + s : c + 2 * s] for i, (t, c) in enumerate(zip(tops, lefts))]
        )
        return out.unsqueeze(1).contiguous(), Placement(shape, tops, lefts)

    def mask_to_model(self, mask, placement: Placement) -> torch.Tensor:
        """(n, rows, columns) boolean mask on the slice grid -> (n, 1, S, S) bool on the model squares of
        `placement` (as `to_model` placed the slices), False beyond the slice."""
        m = torch.as_tensor(np.asarray(mask), dtype=torch.float32) if not torch.is_tensor(mask) else mask.float()
        shape = placement.scaled_shape
        if tuple(m.shape[1:]) != tuple(shape):
            m = _plain(Resize(shape, mode="bilinear")(m))
        s = self.size
        padded = torch.nn.functional.pad(m, (s, s, s, s), value=0.0)
        out = torch.stack(
            [
                padded[i, t + s : t + 2 * s, c + s : c + 2 * s]
                for i, (t, c) in enumerate(zip(placement.tops, placement.lefts))
            ]
        )
        return (out > 0.5).unsqueeze(1)

    def _corners(self, x: torch.Tensor) -> Tuple[List[int], List[int]]:
        """Top-left corner (may be negative) of the model square in each resampled slice."""
        n, h, w = x.shape
        s = self.size
        tops, lefts = [(h - s) // 2] * n, [(w - s) // 2] * n
        if not (self.config.centre_on_body and self.config.fov_mm):
            return tops, lefts
        body = self.spec.body(x[:, None])[:, 0].float()
        mass = body.sum(dim=(1, 2))
        cy = (body.sum(dim=2) * torch.arange(h, dtype=torch.float32)).sum(dim=1) / mass.clamp_min(1)
        cx = (body.sum(dim=1) * torch.arange(w, dtype=torch.float32)).sum(dim=1) / mass.clamp_min(1)
        for i in range(n):
            if mass[i] > 0:  # what the square takes from beyond the slice is air
                tops[i] = int(round(float(cy[i]) - s / 2))
                lefts[i] = int(round(float(cx[i]) - s / 2))
        return tops, lefts

    def to_slice_grid(self, maps: torch.Tensor, placement: Placement, rows: int, columns: int) -> torch.Tensor:
        """(n, S, S) maps at model resolution -> (n, rows, columns) on the original slice grid (0 outside)."""
        h, w = placement.scaled_shape
        s = self.size
        canvas = torch.zeros((maps.shape[0], h + 2 * s, w + 2 * s), dtype=maps.dtype)
        for i, (t, c) in enumerate(zip(placement.tops, placement.lefts)):
            canvas[i, t + s : t + 2 * s, c + s : c + 2 * s] = maps[i]
        x = canvas[:, s : s + h, s : s + w]
        if (h, w) != (rows, columns):
            x = _plain(Resize((rows, columns), mode="bilinear")(x))
        return x

    def body_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.body(x)


def volume_reference(source, config: PreprocessConfig, batch: int = 32) -> Optional[Tuple[float, float]]:
    """The MRI volume's intensity percentiles (config.mr_percentiles) from a pass over a SliceSource;
    None for CT, whose units (HU) are absolute."""
    if config.modality != "MR":
        return None
    samples = []
    for k0 in range(0, source.num_slices, batch):
        slab = source.read(k0, min(source.num_slices, k0 + batch))
        samples.append(np.asarray(slab, dtype=np.float32).ravel()[::7])
    values = np.concatenate(samples)
    lo, hi = np.percentile(values, config.mr_percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def body_mask(x: torch.Tensor, level: float) -> torch.Tensor:
    """The patient in (n, 1, H, W) slices: the largest connected region above `level`, slightly dilated,
    with enclosed low-density regions (lungs, bowel gas) filled by spanning rows and columns. Keeping
    only the largest region drops the CT table, head holders and blankets, which are not anatomy (and
    also an arm lying apart from the trunk)."""
    tissue = torch.nn.functional.max_pool2d((x > level).float(), 3, stride=1, padding=1) > 0
    tissue = _largest_region(tissue)
    return _span(tissue, 3) & _span(tissue, 2)


def largest_component(mask: np.ndarray, fully_connected: bool = False) -> np.ndarray:
    """The largest connected component of a 2D or 3D bool array (all False where the array is); with
    `fully_connected`, diagonal neighbours touch too (8-connected in 2D), else only faces do."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), fully_connected)
    ranked = sitk.RelabelComponent(components, sortByObjectSize=True)
    return sitk.GetArrayViewFromImage(ranked) == 1


def _largest_region(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of each (H, W) slice of an (n, 1, H, W) mask."""
    out = np.zeros(mask.shape, dtype=bool)
    for i, plane in enumerate(mask[:, 0].cpu().numpy()):
        out[i, 0] = largest_component(plane, fully_connected=True)
    return torch.from_numpy(out).to(mask.device)


def _span(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """True between the first and last True along `dim`."""
    after_first = mask.cummax(dim=dim).values
    before_last = mask.flip(dim).cummax(dim=dim).values.flip(dim)
    return after_first & before_last
