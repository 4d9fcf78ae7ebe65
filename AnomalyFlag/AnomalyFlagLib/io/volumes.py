"""Reading volumes (NRRD, NIfTI, MHA, DICOM series folders) and rejecting unusable ones: damaged voxel
data (`voxel_data`), DICOM folders that are not one evenly spaced series (`dicom_series`), arrays that
are not a real-valued 3D volume, and two inputs that would give one case name."""

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from ..atomic_files import atomic_path
from ..errors import InputError, itk_reason
from .dicom_series import dicom_series_files
from .voxel_data import check_voxel_data

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def case_name(path) -> str:
    """Case identifier: the file name without its volume suffix, or the DICOM folder's name."""
    path = Path(path)
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def refuse_duplicate_case_names(paths, where: str) -> None:
    """Raise when two inputs give the same case name (compared case-insensitively, as output folders may be
    on case-insensitive file systems): the second's outputs would overwrite the first's."""
    seen: Dict[str, Path] = {}
    for p in paths:
        key = case_name(p).lower()
        if key in seen:
            raise InputError(
                f"{where} holds two inputs for case '{case_name(p)}': '{seen[key]}' and '{p}'; outputs are named "
                "after the case, so one would overwrite the other. Rename or move one of them."
            )
        seen[key] = Path(p)


def find_cases(path, name: str = "input") -> List[Path]:
    """Volumes to process under PATH: the file itself, a DICOM series folder, or a folder of volumes
    (each file and each DICOM sub-folder is one case), sorted by name."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{name} '{path}' does not exist.")
    if path.is_file():
        return [path]
    if dicom_series_ids(path):
        return [path]
    cases = sorted(p for p in path.iterdir() if is_volume_file(p))
    cases += sorted(p for p in path.iterdir() if p.is_dir() and dicom_series_ids(p))
    if not cases:
        raise InputError(f"{name} folder '{path}' holds no volumes ({', '.join(VOLUME_SUFFIXES)}) and no DICOM series.")
    refuse_duplicate_case_names(cases, f"{name} folder '{path}'")
    return cases


def read_image(path, name: Optional[str] = None) -> sitk.Image:
    """Read a volume file (after checking its voxel data, see `check_voxel_data`) or a folder holding one
    DICOM series (see `dicom_series_files`)."""
    path = Path(path)
    name = name or "volume"
    if str(path) not in name:
        name = f"{name} '{path}'"
    if not path.exists():
        raise InputError(f"{name} does not exist.")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_series_files(path, dicom_series_ids(path), name))
            return reader.Execute()
        check_voxel_data(path, name)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{name} cannot be read as an image: {itk_reason(exc)}") from None


def dicom_series_ids(folder: Path) -> List[str]:
    """DICOM series in a folder (without ITK's console warning when there are none)."""
    if not any(p.is_file() and not is_volume_file(p) for p in Path(folder).iterdir()):
        return []
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def validate_volume_array(array: np.ndarray, name: str) -> None:
    """Reject arrays the detector cannot score: not 3D, empty, non-finite or constant."""
    if array.ndim != 3:
        raise InputError(f"{name} has {array.ndim} dimensions; a 3D volume (slices x rows x columns) is needed.")
    if array.size == 0 or min(array.shape) == 0:
        raise InputError(f"{name} is empty (shape {tuple(array.shape)}).")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{name} contains {bad} NaN or infinite voxels.")
    if np.issubdtype(array.dtype, np.complexfloating) or array.dtype == bool:
        raise InputError(f"{name} has voxel type {array.dtype}; a real-valued intensity volume is needed.")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(f"{name} is constant (every voxel is {lo}); there is nothing to score.")


def validate_image(image: sitk.Image, name: str) -> None:
    """Checks on a SimpleITK image before reading its voxels: 3D, scalar."""
    if image.GetDimension() != 3:
        raise InputError(
            f"{name} has {image.GetDimension()} dimensions; a 3D volume is needed (size {tuple(image.GetSize())})."
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (single-channel) volume is needed."
        )


def write_image_atomic(image: sitk.Image, path, compress: bool = True) -> None:
    """Write an image through `atomic_path`, so a crash never leaves a partial file."""
    path = Path(path)
    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
