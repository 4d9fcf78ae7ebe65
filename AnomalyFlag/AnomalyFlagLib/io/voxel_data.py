"""Where NRRD, NIfTI and MetaImage files keep their voxels, and checks that the data is whole: compressed
streams (gzip NRRD and NIfTI, zlib MHA) decompressed and verified end to end, raw data as long as its
header says. ITK reads many damaged files as garbage without a word; these checks refuse them by name."""

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..errors import InputError
from .nrrd_header import NRRD_TYPES, read_header


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
