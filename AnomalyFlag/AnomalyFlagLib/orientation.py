"""Which voxel axes of a volume are the slice, row and column axes of an axial slice.

Slices are taken along the voxel axis closest to superior-inferior; within a slice rows run
anterior->posterior and columns patient right->left (the radiological view). The mapping is a pure
axis permutation and flips, so numpy views carry it both ways without copying or resampling.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry


@dataclass(frozen=True)
class AxialFrame:
    """How a (k, j, i) numpy array maps to (slice, row, column) of axial slices."""

    order: Tuple[int, int, int]  # numpy axes of the array, in (slice, row, column) order
    flip_rows: bool
    flip_columns: bool
    slice_ijk_axis: int
    row_spacing: float
    column_spacing: float

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> "AxialFrame":
        d = np.abs(geometry.direction_matrix)  # rows: L, P, S; columns: i, j, k
        assignment = {}
        for lps_axis in np.argsort(-d.max(axis=1)):  # most clear-cut patient axis first
            candidates = [a for a in np.argsort(-d[lps_axis]) if a not in assignment.values()]
            assignment[int(lps_axis)] = int(candidates[0])
        a_x, a_y, a_z = assignment[0], assignment[1], assignment[2]
        dm = geometry.direction_matrix
        return cls(
            order=(2 - a_z, 2 - a_y, 2 - a_x),
            flip_rows=bool(dm[1, a_y] < 0),
            flip_columns=bool(dm[0, a_x] < 0),
            slice_ijk_axis=a_z,
            row_spacing=float(geometry.spacing[a_y]),
            column_spacing=float(geometry.spacing[a_x]),
        )

    @property
    def slices_along_k(self) -> bool:
        return self.slice_ijk_axis == 2

    def view(self, array: np.ndarray) -> np.ndarray:
        """(slice, row, column) view of a (k, j, i) array; writes go through to the array."""
        out = np.transpose(array, self.order)
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_columns:
            out = out[:, :, ::-1]
        return out

    def orient_slab(self, slab: np.ndarray) -> np.ndarray:
        """Turn a (n, j, i) slab of k-slices into (n, row, column); only for slices along k."""
        if not self.slices_along_k:
            raise InputError("slab orientation needs slices along the volume's third axis")
        out = slab if self.order[1] == 1 else np.swapaxes(slab, 1, 2)
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_columns:
            out = out[:, :, ::-1]
        return out

    def unorient_slab(self, slab: np.ndarray) -> np.ndarray:
        """Inverse of `orient_slab`."""
        out = slab
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_columns:
            out = out[:, :, ::-1]
        return out if self.order[1] == 1 else np.swapaxes(out, 1, 2)


MIN_SLICE_PIXELS = 16
"""Fewest rows and columns of an axial slice. Clinical slices have 64 or more (low-resolution MR); 16
still admits small synthetic volumes, and anything smaller is a thumbnail, an icon or a test pattern."""
MIN_FIELD_OF_VIEW_MM = 10.0
MAX_FIELD_OF_VIEW_MM = 1000.0
"""The in-plane extent of a slice (mm) in each direction: CT bores and MR fields of view are well below
a metre, and a slice narrower than a centimetre is a header whose spacing is not in millimetres."""


def check_slice_stack(geometry: Geometry, name: str, frame: Optional[AxialFrame] = None) -> None:
    """Refuse geometry that cannot be a CT or MR slice stack (whatever the model): spacing that is not a
    positive number of millimetres, a degenerate direction matrix, axial slices of fewer than
    MIN_SLICE_PIXELS rows or columns, or an in-plane extent outside MIN_FIELD_OF_VIEW_MM to
    MAX_FIELD_OF_VIEW_MM. Resampling such slices to a model's pixel size would give nonsense or, for huge
    extents, exhaust memory."""
    spacing = np.asarray(geometry.spacing, dtype=float)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise InputError(f"{name} has voxel spacing {shown} mm; every spacing must be a positive number of mm.")
    direction = geometry.direction_matrix
    if not (np.isfinite(direction).all() and abs(np.linalg.det(direction)) > 1e-3):
        raise InputError(f"{name} has an invalid direction matrix {tuple(geometry.direction)}: its axes are not 3D.")
    frame = frame or AxialFrame.from_geometry(geometry)
    rows = geometry.size[2 - frame.order[1]]
    columns = geometry.size[2 - frame.order[2]]
    if min(rows, columns) < MIN_SLICE_PIXELS:
        raise InputError(
            f"{name} has axial slices of {rows} x {columns} pixels; a CT or MR slice has at least "
            f"{MIN_SLICE_PIXELS} x {MIN_SLICE_PIXELS}."
        )
    height, width = rows * frame.row_spacing, columns * frame.column_spacing
    extent = f"{_mm(height)} x {_mm(width)} mm ({rows} x {columns} pixels of {_mm(frame.row_spacing)} x "
    extent += f"{_mm(frame.column_spacing)} mm)"
    if max(height, width) > MAX_FIELD_OF_VIEW_MM:
        raise InputError(
            f"{name} has axial slices of {extent}, larger than any scanner's field of view "
            f"({MAX_FIELD_OF_VIEW_MM:g} mm); is the pixel spacing in its header right?"
        )
    if min(height, width) < MIN_FIELD_OF_VIEW_MM:
        raise InputError(
            f"{name} has axial slices of only {extent}, smaller than any CT or MR field of view "
            f"({MIN_FIELD_OF_VIEW_MM:g} mm); is the pixel spacing in its header in millimetres?"
        )


def _mm(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if abs(value) >= 1 else f"{value:.3g}"


def slice_positions_mm(geometry: Geometry, frame: AxialFrame) -> np.ndarray:
    """Superior coordinate (mm) of each slice's centre, in slice order."""
    size = np.asarray(geometry.size, dtype=float)
    n = geometry.size[frame.slice_ijk_axis]
    centre = (size - 1) / 2.0
    ijk = np.tile(centre, (n, 1))
    ijk[:, frame.slice_ijk_axis] = np.arange(n)
    step = geometry.direction_matrix @ np.diag(geometry.spacing)
    return geometry.origin[2] + ijk @ step[2]


def relative_positions(z_mm: np.ndarray, z_range=None) -> np.ndarray:
    """Relative position in [0, 1] (0 inferior, 1 superior) within the scan or within `z_range`
    (the reference segment's z-extent); positions outside the range are clipped."""
    lo, hi = (float(np.min(z_mm)), float(np.max(z_mm))) if z_range is None else z_range
    if hi - lo < 1e-6:
        return np.full(len(z_mm), 0.5)
    return np.clip((np.asarray(z_mm, dtype=float) - lo) / (hi - lo), 0.0, 1.0)
