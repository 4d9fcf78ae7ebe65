"""Image geometry in ITK's LPS convention, and checks that two grids are the same."""

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

Vector3 = Tuple[float, float, float]


@dataclass(frozen=True)
class Geometry:
    """Voxel grid: size (i, j, k), spacing (mm), origin (LPS mm) and direction (row-major 3x3)."""

    size: Tuple[int, int, int]
    spacing: Vector3
    origin: Vector3
    direction: Tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(
            size=tuple(int(v) for v in data["size"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, ijk) -> np.ndarray:
        """Physical LPS position (mm) of a continuous voxel index (i, j, k)."""
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + self.direction_matrix @ (np.asarray(self.spacing) * ijk)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: "Geometry", tolerance_mm: float = 1e-3) -> bool:
        if self.size != other.size:
            return False
        if not np.allclose(self.spacing, other.spacing, atol=tolerance_mm, rtol=1e-5):
            return False
        if not np.allclose(self.origin, other.origin, atol=tolerance_mm, rtol=0):
            return False
        return bool(np.allclose(self.direction, other.direction, atol=1e-5))

    def describe(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        org = ", ".join(f"{o:.1f}" for o in self.origin)
        return f"size {self.size[0]}x{self.size[1]}x{self.size[2]}, spacing {sp} mm, origin ({org})"


def require_same_geometry(reference: Geometry, other: Geometry, reference_name: str, other_name: str):
    """Raise an InputError naming both inputs when their voxel grids differ."""
    if not reference.matches(other):
        raise InputError(
            f"{other_name} does not match the geometry of {reference_name}: "
            f"{other.describe()} versus {reference.describe()}. Resample it onto the image grid first."
        )
