"""Slices to network inputs and network maps back to the slice grid, with MONAI array transforms.

A batch of n slices is handled as one n-channel image, so every transform runs once per batch.
"""

from typing import Tuple

import numpy as np
import torch
from monai.transforms import Resize, ResizeWithPadOrCrop, ScaleIntensityRange

from .config import PreprocessConfig


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class SlicePreprocessor:
    """Windowing, field-of-view resampling and padding of axial slices for a given image size."""

    def __init__(self, config: PreprocessConfig, image_size: int):
        self.config = config
        self.size = image_size
        self.window = ScaleIntensityRange(
            a_min=config.window_min, a_max=config.window_max, b_min=-1.0, b_max=1.0, clip=True
        )
        self.pad_crop = ResizeWithPadOrCrop((image_size, image_size), mode="constant", value=-1.0)

    def scaled_shape(self, rows: int, columns: int, row_spacing: float, column_spacing: float) -> Tuple[int, int]:
        """Size of the slice once resampled to the model's pixel size (fov_mm / image_size)."""
        if not self.config.fov_mm:
            return self.size, self.size
        pixel = self.config.fov_mm / self.size
        return max(1, round(rows * row_spacing / pixel)), max(1, round(columns * column_spacing / pixel))

    def to_model(self, slab: np.ndarray, row_spacing: float, column_spacing: float) -> torch.Tensor:
        """(n, rows, columns) intensities -> (n, 1, S, S) float32 in [-1, 1]."""
        x = torch.from_numpy(np.array(slab, dtype=np.float32, order="C"))
        x = _plain(self.window(x))
        shape = self.scaled_shape(slab.shape[1], slab.shape[2], row_spacing, column_spacing)
        if shape != tuple(x.shape[1:]):
            mode = "area" if shape[0] < x.shape[1] else "bilinear"
            x = _plain(Resize(shape, mode=mode)(x))
        x = _plain(self.pad_crop(x))
        return x.unsqueeze(1).contiguous()

    def to_slice_grid(
        self, maps: torch.Tensor, rows: int, columns: int, row_spacing: float, column_spacing: float
    ) -> torch.Tensor:
        """(n, S, S) maps at model resolution -> (n, rows, columns) on the original slice grid."""
        shape = self.scaled_shape(rows, columns, row_spacing, column_spacing)
        x = _plain(ResizeWithPadOrCrop(shape, mode="constant", value=0.0)(maps))
        if shape != (rows, columns):
            x = _plain(Resize((rows, columns), mode="bilinear")(x))
        return x

    def body_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Inside-the-body pixels of (n, 1, H, W) windowed slices (see `body_mask`)."""
        c = self.config
        level = (c.body_threshold - c.window_min) / (c.window_max - c.window_min) * 2 - 1
        return body_mask(x, level)


def body_mask(x: torch.Tensor, level: float) -> torch.Tensor:
    """Pixels of (n, 1, H, W) slices above `level`, slightly dilated, with enclosed low-density regions
    (lungs, bowel gas) filled by spanning rows and columns."""
    tissue = torch.nn.functional.max_pool2d((x > level).float(), 3, stride=1, padding=1) > 0
    return _span(tissue, 3) & _span(tissue, 2)


def _span(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """True between the first and last True along `dim`."""
    after_first = mask.cummax(dim=dim).values
    before_last = mask.flip(dim).cummax(dim=dim).values.flip(dim)
    return after_first & before_last
