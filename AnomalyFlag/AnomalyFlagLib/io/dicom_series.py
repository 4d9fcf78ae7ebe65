"""DICOM series folders: one series of parallel, evenly spaced, distinct slices, in position order.

A missing slice would otherwise be rebuilt at uniform spacing (wrong geometry), and a folder with
several series would be scored as one of them, silently."""

from pathlib import Path
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, itk_reason, printable


def _dicom_tags(file: str, name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{name}: DICOM file '{Path(file).name}' cannot be read: {itk_reason(exc)}") from None
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> Optional[str]:
    return printable(reader.GetMetaData(key).strip(), 80) if reader.HasMetaDataKey(key) else None


def dicom_series_files(folder, ids: List[str], name: str) -> List[str]:
    """The files of the one DICOM series in `folder`, in slice order, after checking that they form one
    evenly spaced stack: several series, localizers, mixed orientations, duplicated or missing slices are
    refused with the files concerned named."""
    folder = Path(folder)
    if not ids:
        raise InputError(f"{name} is a folder without a DICOM series.")
    if len(ids) > 1:
        listed = []
        for sid in sorted(ids):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
            tags = _dicom_tags(files[0], name)
            number, description = _tag(tags, "0020|0011"), _tag(tags, "0008|103e")
            about = ([f"series {number}"] if number else []) + ([f"'{description}'"] if description else [])
            listed.append(f"{printable(sid, 80)} ({', '.join(about + [f'{len(files)} files'])})")
        raise InputError(
            f"{name} holds {len(ids)} DICOM series: {'; '.join(listed)}. Put each series in its own folder "
            "(one folder per case)."
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    listed = {Path(f).name for f in files}
    unused = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed)
    return _check_slice_positions(files, name, unused)


def _numbers(reader, key: str, count: int, file: str, name: str) -> Optional[np.ndarray]:
    text = _tag(reader, key)
    if not text:
        return None
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=float)
    except ValueError:
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise InputError(f"{name}: DICOM file '{Path(file).name}' has an unreadable {key} value '{text}'.")
    return values


def _mm(value: float) -> str:
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _check_slice_positions(files: List[str], name: str, unused: Optional[List[str]] = None) -> List[str]:
    """`files` sorted along the slice normal (ImagePositionPatient 0020|0032 projected on the normal of
    ImageOrientationPatient 0020|0037), or an InputError when they do not form an evenly spaced stack
    (naming the `unused` files of the folder, which may be the missing slices, damaged)."""
    readers = [_dicom_tags(f, name) for f in files]
    localizers = [f for f, r in zip(files, readers) if "LOCALIZER" in (_tag(r, "0008|0008") or "").upper()]
    if localizers:
        shown = ", ".join(Path(f).name for f in localizers[:3]) + (", ..." if len(localizers) > 3 else "")
        if len(localizers) == len(files):
            raise InputError(
                f"{name} is a localizer (scout) series ({shown}), not a stack of CT or MR slices; give the folder "
                "of an axial series."
            )
        raise InputError(f"{name} mixes localizer (scout) images ({shown}) with its slices; remove them.")
    if len(files) < 2:
        return files
    positions = [_numbers(r, "0020|0032", 3, f, name) for f, r in zip(files, readers)]
    orientations = [_numbers(r, "0020|0037", 6, f, name) for f, r in zip(files, readers)]
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return files  # no geometry to check: ITK orders them as GDCM found them
    for f, o in zip(files, orientations):
        if not np.allclose(o, orientations[0], atol=1e-3):
            raise InputError(
                f"{name}: files '{Path(files[0]).name}' and '{Path(f).name}' have different slice orientations "
                "(ImageOrientationPatient); the series mixes acquisitions. Put one stack of parallel slices in "
                "the folder."
            )
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    if not np.linalg.norm(normal) > 1e-6:
        raise InputError(f"{name}: file '{Path(files[0]).name}' has an invalid ImageOrientationPatient.")
    z = np.array([p @ normal for p in positions]) / np.linalg.norm(normal)
    order = np.argsort(z, kind="stable")
    files, z = [files[i] for i in order], z[order]
    step = np.diff(z)
    same = np.flatnonzero(step < 1e-3)
    if len(same):
        i = same[0]
        raise InputError(
            f"{name}: files '{Path(files[i]).name}' and '{Path(files[i + 1]).name}' lie at the same slice position "
            f"({_mm(z[i])} mm); a slice is duplicated or the series holds several acquisitions (echoes, phases)."
        )
    # 10% + 0.1 mm allows for positions rounded to 0.1 mm; a missing slice doubles a step.
    agree = (np.abs(step[None, :] - step[:, None]) <= 0.1 * step[:, None] + 0.1).sum(axis=1)
    typical = step[np.lexsort((step, -agree))[0]]
    odd = np.flatnonzero(np.abs(step - typical) > 0.1 * typical + 0.1)
    if len(odd):
        i = odd[0]
        a, b = Path(files[i]).name, Path(files[i + 1]).name
        more = f" ({len(odd) - 1} more uneven steps)" if len(odd) > 1 else ""
        if step[i] > typical:
            missing = int(round(step[i] / typical)) - 1
            guess = "is a slice missing?" if missing <= 1 else f"are {missing} slices missing?"
            if unused:
                shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
                guess += f" The folder also holds {shown}, which the series does not include (damaged or not DICOM)."
            text = f"slice positions jump by {_mm(step[i])} mm between files '{a}' and '{b}'"
        else:
            guess = "the series is unevenly spaced."
            text = f"files '{a}' and '{b}' are only {_mm(step[i])} mm apart"
        raise InputError(f"{name}: {text} where the others are {_mm(typical)} mm apart{more}; {guess}")
    return files
