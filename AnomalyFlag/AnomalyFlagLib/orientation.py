"""Which voxel axes of a volume are the slice, row and column axes of an axial slice.

Slices are taken along the voxel axis closest to superior-inferior; within a slice rows run
anterior->posterior and columns patient right->left (the radiological view). The mapping is a pure
axis permutation and flips, so numpy views carry it both ways without copying or resampling.
"""

from dataclasses import dataclass
from typing import Tuple

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
