"""Region of interest from a segmentation or label map: aligned to the image grid, dilated by a margin."""

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Geometry, require_same_geometry
from .io.volumes import read_image
from .orientation import AxialFrame


def _to_label_array(image: sitk.Image, name: str) -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() > 1:  # multi-layer segmentation: any layer non-zero
        array = sitk.GetArrayFromImage(image)
        return np.any(array != 0, axis=-1).astype(np.uint8) if array.ndim == 4 else array
    if image.GetDimension() != 3:
        raise InputError(f"{name} has {image.GetDimension()} dimensions; a 3D label map is needed.")
    return sitk.GetArrayFromImage(image)


def roi_on_image_grid(
    roi: Union[str, Path, sitk.Image, np.ndarray],
    geometry: Geometry,
    labels: Optional[Sequence[int]] = None,
    name: str = "segmentation",
    allow_empty: bool = False,
) -> np.ndarray:
    """Boolean (k, j, i) mask on the image grid. A segmentation stored cropped to its extent (as Slicer
    saves .seg.nrrd) is placed back when it shares spacing and direction and sits on the same grid."""
    if isinstance(roi, np.ndarray):
        array = roi
        if tuple(array.shape[::-1]) != geometry.size:
            raise InputError(f"{name} has shape {array.shape}, the image has {geometry.size[::-1]} (k, j, i).")
    else:
        image = roi if isinstance(roi, sitk.Image) else read_image(roi, f"{name} '{roi}'")
        roi_geometry = Geometry.from_image(image)
        array = _to_label_array(image, name)
        if not roi_geometry.matches(geometry):
            array = _paste_cropped(array, roi_geometry, geometry, name)
    mask = np.isin(array, list(labels)) if labels else array != 0
    if not allow_empty and not mask.any():
        wanted = f" with labels {list(labels)}" if labels else ""
        raise InputError(f"{name} holds no voxels{wanted}; nothing to restrict scoring to.")
    return mask


def _paste_cropped(array, roi_geometry: Geometry, geometry: Geometry, name: str) -> np.ndarray:
    same_axes = np.allclose(roi_geometry.direction, geometry.direction, atol=1e-5) and np.allclose(
        roi_geometry.spacing, geometry.spacing, rtol=1e-4
    )
    if same_axes:
        offset = np.linalg.solve(
            geometry.direction_matrix @ np.diag(geometry.spacing),
            np.asarray(roi_geometry.origin) - np.asarray(geometry.origin),
        )
        start = np.round(offset).astype(int)
        end = start + np.asarray(roi_geometry.size)
        if np.allclose(offset, start, atol=1e-3) and (start >= 0).all() and (end <= np.asarray(geometry.size)).all():
            full = np.zeros(geometry.size[::-1], dtype=array.dtype)
            full[start[2] : end[2], start[1] : end[1], start[0] : end[0]] = array
            return full
    require_same_geometry(geometry, roi_geometry, "the image", name)
    return array


MAX_MARGIN_MM = 200.0


def check_margin_mm(margin_mm) -> float:
    """The ROI margin as a float in [0, MAX_MARGIN_MM] mm, or an InputError saying what is wrong."""
    try:
        value = float(margin_mm)
    except (TypeError, ValueError):
        raise InputError(f"ROI margin {margin_mm!r} is not a number of millimetres.") from None
    if not 0.0 <= value <= MAX_MARGIN_MM:  # also refuses NaN
        raise InputError(f"ROI margin {margin_mm!r} mm is outside 0 to {MAX_MARGIN_MM:g} mm.")
    return value


def check_labels(labels) -> Optional[list]:
    """ROI label values as a list of positive ints (None: any non-zero), or an InputError."""
    if labels is None:
        return None
    values = list(labels)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in values):
        raise InputError(f"ROI labels {values!r} must be positive integers (0 is the background).")
    return [int(v) for v in values]


class RoiSlabs:
    """Dilated ROI slabs in the scoring orientation; dilation is separable (max is separable)."""

    def __init__(self, mask: np.ndarray, geometry: Geometry, margin_mm: float):
        margin_mm = check_margin_mm(margin_mm)
        frame = AxialFrame.from_geometry(geometry)
        self.view = frame.view(mask)
        slice_spacing = geometry.spacing[frame.slice_ijk_axis]
        self.radius = (
            int(round(margin_mm / slice_spacing)),
            int(round(margin_mm / frame.row_spacing)),
            int(round(margin_mm / frame.column_spacing)),
        )
        present = self.view.any(axis=(1, 2))
        self.slices = np.flatnonzero(present)
        rz = self.radius[0]
        near = np.zeros(len(present), dtype=bool)
        for k in self.slices:
            near[max(0, k - rz) : k + rz + 1] = True
        self.near_roi = near
        z = np.flatnonzero(present)
        self.extent = (int(z.min()), int(z.max()))

    def slab(self, k0: int, k1: int) -> torch.Tensor:
        rz, rr, rc = self.radius
        lo, hi = max(0, k0 - rz), min(self.view.shape[0], k1 + rz)
        m = torch.from_numpy(np.ascontiguousarray(self.view[lo:hi], dtype=np.float32))[None, None]
        if rz:
            m = torch.nn.functional.max_pool3d(m, (2 * rz + 1, 1, 1), stride=1, padding=(rz, 0, 0))
        if rr:
            m = torch.nn.functional.max_pool3d(m, (1, 2 * rr + 1, 1), stride=1, padding=(0, rr, 0))
        if rc:
            m = torch.nn.functional.max_pool3d(m, (1, 1, 2 * rc + 1), stride=1, padding=(0, 0, rc))
        return m[0, 0, k0 - lo : k0 - lo + (k1 - k0)] > 0.5
