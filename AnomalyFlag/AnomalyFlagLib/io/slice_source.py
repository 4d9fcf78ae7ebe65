"""Axial slabs of a volume, from memory or streamed from a file, plus running input checks.

A file is streamed when its format allows reading a range of slices (NRRD raw/gzip, NIfTI, raw MHA)
and its slices lie along the third voxel axis; anything else is read whole.
"""

from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, itk_reason
from ..geometry import Geometry
from ..orientation import AxialFrame, check_slice_stack
from .nrrd_stream import NrrdSlabReader
from .volumes import read_image, validate_image, validate_volume_array
from .voxel_data import check_voxel_data


class SliceSource:
    """Oriented axial slabs (slice, row, column) of one volume, read in increasing slice order; geometry
    that cannot be a CT or MR slice stack is refused on opening (`check_slice_stack`)."""

    def __init__(self, name: str, geometry: Geometry):
        self.name = name
        self.geometry = geometry
        self.frame = AxialFrame.from_geometry(geometry)
        check_slice_stack(geometry, name, self.frame)
        shape = np.transpose(np.empty(geometry.size[::-1], dtype=np.uint8), self.frame.order).shape
        self.num_slices, self.rows, self.columns = shape
        self._lo, self._hi = np.inf, -np.inf

    def read(self, k0: int, k1: int) -> np.ndarray:
        slab = self._read(k0, k1)
        if np.issubdtype(slab.dtype, np.floating) and not np.isfinite(slab).all():
            bad = int(np.count_nonzero(~np.isfinite(slab)))
            raise InputError(f"{self.name} contains NaN or infinite voxels ({bad} in slices {k0}-{k1 - 1}).")
        self._lo, self._hi = min(self._lo, slab.min()), max(self._hi, slab.max())
        return slab

    @property
    def value_range(self):
        """The lowest and highest voxel value read so far."""
        return float(self._lo), float(self._hi)

    def check_not_constant(self) -> None:
        """Raise if every voxel read so far had the same value (call after reading all slices)."""
        if self._lo == self._hi:
            raise InputError(f"{self.name} is constant (every voxel is {self._lo}); there is nothing to score.")

    def _read(self, k0: int, k1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ArraySource(SliceSource):
    def __init__(self, array: np.ndarray, geometry: Geometry, name: str, owner=None):
        validate_volume_array(array, name)
        self._owner = owner  # keeps the image alive that `array` is a view of
        if tuple(array.shape[::-1]) != geometry.size:
            raise InputError(f"{name}: array shape {array.shape} does not match geometry size {geometry.size}.")
        super().__init__(name, geometry)
        self.view = self.frame.view(array)

    def _read(self, k0, k1):
        return self.view[k0:k1]


class NrrdStreamSource(SliceSource):
    def __init__(self, reader: NrrdSlabReader, geometry: Geometry, name: str):
        super().__init__(name, geometry)
        self.reader = reader

    def _read(self, k0, k1):
        try:
            return self.frame.orient_slab(self.reader.read(k0, k1))
        except OSError as exc:
            raise InputError(f"{self.name} cannot be read: {exc}") from None

    def close(self):
        self.reader.close()


class ItkExtractSource(SliceSource):
    def __init__(self, reader: sitk.ImageFileReader, geometry: Geometry, name: str):
        super().__init__(name, geometry)
        self.reader = reader

    def _read(self, k0, k1):
        self.reader.SetExtractIndex((0, 0, k0))
        self.reader.SetExtractSize((self.geometry.size[0], self.geometry.size[1], k1 - k0))
        try:
            return self.frame.orient_slab(sitk.GetArrayFromImage(self.reader.Execute()))
        except RuntimeError as exc:
            raise InputError(f"{self.name} cannot be read: {itk_reason(exc)}") from None


def _itk_streams(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".nii"):
        return True
    if name.endswith((".mha", ".mhd")):
        with open(path, "rb") as f:
            head = f.read(4096).decode("latin-1").lower().replace(" ", "")
        return "compresseddata=true" not in head
    return False


def open_source(
    volume: Union[str, Path, sitk.Image, np.ndarray],
    geometry: Optional[Geometry] = None,
    name: Optional[str] = None,
    stream: bool = True,
) -> SliceSource:
    """A SliceSource for a path (file or DICOM folder), a SimpleITK image, or a (k, j, i) array + geometry."""
    if isinstance(volume, np.ndarray):
        if geometry is None:
            if volume.ndim != 3:
                validate_volume_array(volume, name or "input array")
            geometry = Geometry(tuple(volume.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
        return ArraySource(volume, geometry, name or "input array")
    if isinstance(volume, sitk.Image):
        name = name or "input image"
        validate_image(volume, name)
        return ArraySource(sitk.GetArrayViewFromImage(volume), Geometry.from_image(volume), name, owner=volume)
    path = Path(volume)
    name = name or f"volume '{path}'"
    if path.is_file() and stream:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            check_voxel_data(path, name)  # a damaged compressed file says so, rather than "no reader"
            raise InputError(f"{name} cannot be read as an image: {itk_reason(exc)}") from None
        if reader.GetDimension() != 3:
            raise InputError(f"{name} has {reader.GetDimension()} dimensions; a 3D volume is needed.")
        if reader.GetNumberOfComponents() != 1:
            raise InputError(
                f"{name} has {reader.GetNumberOfComponents()} components per voxel; a scalar volume is needed."
            )
        geometry = Geometry(
            tuple(int(s) for s in reader.GetSize()),
            tuple(reader.GetSpacing()),
            tuple(reader.GetOrigin()),
            tuple(reader.GetDirection()),
        )
        if min(geometry.size) == 0:
            raise InputError(f"{name} is empty (size {geometry.size}).")
        check_slice_stack(geometry, name)  # before any voxel is read
        if AxialFrame.from_geometry(geometry).slices_along_k:
            if path.name.lower().endswith((".nrrd", ".nhdr")):
                slab_reader = NrrdSlabReader.open(path, name)
                shape = None if slab_reader is None else (slab_reader.columns, slab_reader.rows, slab_reader.num_slices)
                if shape == geometry.size:
                    return NrrdStreamSource(slab_reader, geometry, name)
            elif _itk_streams(path):
                check_voxel_data(path, name)
                return ItkExtractSource(reader, geometry, name)
    image = read_image(path, name)
    validate_image(image, name)
    return ArraySource(sitk.GetArrayFromImage(image), Geometry.from_image(image), name)
