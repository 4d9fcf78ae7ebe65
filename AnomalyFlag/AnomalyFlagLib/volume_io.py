"""Reading volumes (NRRD, NIfTI, MHA, DICOM series folders) and rejecting unusable ones.

Damaged files are refused rather than read as garbage: compressed voxel data (gzip NRRD and NIfTI,
zlib MHA) is decompressed and verified end to end, raw voxel data must be as long as its header says,
and a DICOM folder must hold one evenly spaced series.
"""

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError

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
            reader.SetFileNames(dicom_series_files(path, name))
            return reader.Execute()
        check_voxel_data(path, name)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{name} cannot be read as an image: {itk_reason(exc)}") from None


def itk_reason(exc: RuntimeError) -> str:
    """The last line of an ITK error, which says what went wrong, as printable text."""
    text = str(exc).strip()
    return printable(text.splitlines()[-1]) if text else "unknown error"


def printable(text: str, limit: int = 200) -> str:
    """Text taken from a file, safe to show: undecodable bytes (surrogate escapes) and control characters
    as \\xNN escapes, shortened to `limit` characters."""
    out = "".join(
        c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c) & 0xFF:02x}" for c in str(text)
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Voxel data: compressed streams verified end to end, raw data as long as the header says


class CheckedStream:
    """The decompressed bytes of a gzip or zlib stream in an open file, from its current position.

    gzip streams are checked against their CRC-32 and length, zlib streams against their Adler-32, when
    the end is read (`read_to_end`). Any damage (corrupt data, truncation, checksum mismatch) raises an
    InputError naming the file (`name`) instead of zlib's or gzip's own exceptions.
    """

    def __init__(self, file, name: str, codec: str = "gzip"):
        self.name, self.codec = name, codec
        self._stream = gzip.GzipFile(fileobj=file, mode="rb") if codec == "gzip" else _ZlibReader(file)

    def read(self, nbytes: int) -> bytes:
        """`nbytes` bytes, or fewer where the stream ends."""
        try:
            return self._stream.read(nbytes)
        except (zlib.error, EOFError, OSError) as exc:
            raise self._error(exc) from None

    def read_to_end(self) -> int:
        """Read (and verify) the rest of the stream; the number of bytes that were left."""
        left = 0
        while True:
            chunk = self.read(1 << 22)
            if not chunk:
                return left
            left += len(chunk)

    def _error(self, exc: Exception) -> InputError:
        if isinstance(exc, EOFError):
            return InputError(f"{self.name} is damaged: its {self.codec} data ends early (the file is truncated).")
        if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
            return InputError(f"{self.name} is damaged: its {self.codec} data is corrupt ({exc}).")
        return InputError(f"{self.name} cannot be read: {exc}")


class _ZlibReader:
    """Incremental reader of one zlib stream (MetaImage's CompressedData), ending at its checksum."""

    def __init__(self, file):
        self._file = file
        self._inflate = zlib.decompressobj()

    def read(self, nbytes: int) -> bytes:
        out = []
        while nbytes > 0 and not self._inflate.eof:
            data = self._inflate.unconsumed_tail or self._file.read(1 << 16)
            if not data:
                raise EOFError("compressed data ended before the end-of-stream marker was reached")
            piece = self._inflate.decompress(data, nbytes)
            out.append(piece)
            nbytes -= len(piece)
        return b"".join(out)


@dataclass
class VoxelData:
    """Where a volume file keeps its voxels: `file` from byte `offset`, compressed with `codec` (None for raw);
    `nbytes` of voxels of `slice_bytes` per slice follow `skip` bytes (a header inside the stream)."""

    file: Path
    offset: int
    codec: Optional[str]
    nbytes: int
    slice_bytes: int
    skip: int = 0


def check_voxel_data(path, name: str) -> None:
    """Refuse a volume file whose voxel data is damaged: compressed data (gzip NRRD or NIfTI, zlib MHA) must
    decompress without error and pass its checksum, and raw or decompressed data must hold the bytes the
    header describes (no fewer, and not a whole slice more). Layouts not understood here are left to ITK."""
    try:
        data = voxel_data(path, name)
    except (OSError, ValueError, struct.error, KeyError):
        return  # a header ITK will report on, or a layout not covered here
    if data is None:
        return
    if not data.file.is_file():
        raise InputError(f"{name} keeps its voxels in '{data.file}', which does not exist.")
    try:
        if data.codec is None:
            size = data.file.stat().st_size - data.offset
        else:
            with open(data.file, "rb") as f:
                f.seek(data.offset)
                size = CheckedStream(f, name, data.codec).read_to_end() - data.skip
    except OSError as exc:
        raise InputError(f"{name} cannot be read: {exc}") from None
    check_data_length(size, data, name)


def check_data_length(size: int, data: VoxelData, name: str) -> None:
    """Raise when `size` bytes of voxel data are fewer than the header needs, or at least a slice more."""
    if size < data.nbytes:
        shown = "its" if data.codec is None else f"its decompressed {data.codec}"
        size = max(size, 0)
        raise InputError(
            f"{name} is truncated: {shown} voxel data has {size} of the {data.nbytes} bytes its header "
            f"describes ({data.nbytes - size} missing)."
        )
    if data.slice_bytes and size - data.nbytes >= data.slice_bytes:
        raise InputError(
            f"{name} has {size - data.nbytes} bytes more voxel data than its header's sizes describe (at least "
            "one more slice); its header is probably damaged."
        )


def voxel_data(path, name: Optional[str] = None) -> Optional[VoxelData]:
    """The voxel data layout of an NRRD, NIfTI or MetaImage file, or None for layouts not covered
    (text encodings, multi-file data, skipped lines); `name` names the file in errors."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith((".nrrd", ".nhdr")):
        return _nrrd_data(path)
    if lower.endswith((".nii", ".nii.gz")):
        with open(path, "rb") as f:
            head = f.read(540)
            if not head.startswith(b"\x1f\x8b"):  # ITK also reads uncompressed files named .nii.gz
                return _nifti_data(path, head, None)
            f.seek(0)
            return _nifti_data(path, CheckedStream(f, name or f"'{path}'").read(540), "gzip")
    if lower.endswith((".mha", ".mhd")):
        return _metaimage_data(path)
    return None


def _nrrd_data(path: Path) -> Optional[VoxelData]:
    from .nrrd_stream import NRRD_TYPES, read_header

    fields = read_header(path)
    if not fields or fields.get("type", "").lower() not in NRRD_TYPES:
        return None
    codec = {"raw": None, "gzip": "gzip", "gz": "gzip"}.get(fields.get("encoding", "raw").lower(), "other")
    if codec == "other" or int(fields.get("line skip", 0) or 0) or int(fields.get("byte skip", 0) or 0):
        return None
    file, offset = path, int(fields["_data_offset"])
    detached = fields.get("data file", fields.get("datafile"))
    if detached is not None:
        if len(detached.split()) != 1 or detached.upper() == "LIST":
            return None
        file, offset = path.parent / detached, 0
    sizes = [int(s) for s in fields["sizes"].split()]
    itemsize = np.dtype(NRRD_TYPES[fields["type"].lower()]).itemsize
    return VoxelData(file, offset, codec, int(np.prod(sizes)) * itemsize, int(np.prod(sizes[:-1])) * itemsize)


def _nifti_data(path: Path, head: bytes, codec: Optional[str]) -> Optional[VoxelData]:
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or min(dims[1 : ndim + 1]) < 1 or bitpix <= 0 or bitpix % 8 or offset < 348:
        return None
    nbytes = int(np.prod(dims[1 : ndim + 1], dtype=np.int64)) * bitpix // 8
    slice_bytes = int(np.prod(dims[1 : min(ndim, 2) + 1], dtype=np.int64)) * bitpix // 8
    if codec is None:
        return VoxelData(path, offset, None, nbytes, slice_bytes)
    return VoxelData(path, 0, codec, nbytes, slice_bytes, skip=offset)


_MET_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _metaimage_data(path: Path) -> Optional[VoxelData]:
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline(4096)
            if not line or f.tell() > (1 << 16):
                return None
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                offset = f.tell()
                break
    if fields.get("binarydata", "true").lower() != "true" or fields.get("elementtype", "") not in _MET_TYPES:
        return None
    sizes = [int(s) for s in fields["dimsize"].split()]
    itemsize = _MET_TYPES[fields["elementtype"]] * int(fields.get("elementnumberofchannels", "1"))
    codec = "zlib" if fields.get("compresseddata", "false").lower() == "true" else None
    target = fields["elementdatafile"]
    file = path
    if target.upper() != "LOCAL":
        if len(target.split()) != 1 or target.upper() == "LIST" or "%" in target:
            return None
        file, offset = path.parent / target, int(fields.get("headersize", "0"))
        if offset < 0:
            return None
    return VoxelData(file, offset, codec, int(np.prod(sizes)) * itemsize, int(np.prod(sizes[:-1])) * itemsize)


# ----------------------------------------------------------------------------------------------------
# DICOM series folders


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


def dicom_series_files(folder, name: str) -> List[str]:
    """The files of the one DICOM series in `folder`, in slice order, after checking that they form one
    evenly spaced stack: several series, localizers, mixed orientations, duplicated or missing slices are
    refused with the files concerned named."""
    folder = Path(folder)
    ids = dicom_series_ids(folder)
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
    """Write an image through a temporary file and rename it, so a crash never leaves a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
