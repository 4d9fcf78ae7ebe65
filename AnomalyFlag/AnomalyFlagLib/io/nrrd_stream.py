"""Slab-by-slab NRRD reading and writing, so memory does not grow with the number of slices.

ITK reads a whole NRRD file even when asked for a region; these handle the common attached-header
files (raw or gzip encoding) sequentially. Geometry always comes from SimpleITK's header reader.
"""

import gzip
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..atomic_files import atomic_path
from ..errors import InputError
from ..geometry import Geometry
from .nrrd_header import NRRD_TYPES, read_header
from .voxel_data import CheckedStream, VoxelData, check_data_length, check_voxel_data


class NrrdSlabReader:
    """Sequential reader of k-slabs from a 3D NRRD with raw or gzip encoding.

    gzip data is verified (CRC-32 and length) when the last slice is read, and raw data's length when the
    reader opens, so a damaged file raises an InputError naming it before its last slab is returned."""

    def __init__(self, path, fields: Dict[str, str], name: Optional[str] = None):
        self.path = Path(path)
        self.name = name or f"NRRD file '{self.path}'"
        sizes = [int(s) for s in fields["sizes"].split()]
        self.columns, self.rows, self.num_slices = sizes
        endian = "<" if fields.get("endian", "little") == "little" else ">"
        self.dtype = np.dtype(endian + NRRD_TYPES[fields["type"].lower()])
        self.encoding = fields.get("encoding", "raw").lower()
        self.offset = int(fields["_data_offset"])
        self.slice_bytes = self.columns * self.rows * self.dtype.itemsize
        self._next = 0
        self._file = None
        self._stream: Optional[CheckedStream] = None
        if self.encoding == "raw":
            check_voxel_data(self.path, self.name)

    @classmethod
    def open(cls, path, name: Optional[str] = None) -> Optional["NrrdSlabReader"]:
        """A reader, or None when the file is not a plain single-file 3D scalar NRRD this reader handles."""
        fields = read_header(path)
        if not fields or fields.get("dimension") != "3" or "data file" in fields or "datafile" in fields:
            return None
        if fields.get("type", "").lower() not in NRRD_TYPES:
            return None
        if fields.get("encoding", "raw").lower() not in ("raw", "gzip", "gz"):
            return None
        try:
            if int(fields.get("line skip", 0) or 0) or int(fields.get("byte skip", 0) or 0):
                return None
            sizes = [int(s) for s in fields["sizes"].split()]
        except (KeyError, ValueError):
            return None  # a header ITK reads differently, if at all: leave it to ITK
        if len(sizes) != 3:
            return None
        return cls(path, fields, name)

    def _restart(self):
        self.close()
        self._file = open(self.path, "rb")
        self._file.seek(self.offset)
        self._stream = CheckedStream(self._file, self.name, "gzip") if self.encoding != "raw" else None
        self._next = 0

    def _take(self, nbytes: int) -> bytes:
        data = self._file.read(nbytes) if self._stream is None else self._stream.read(nbytes)
        if len(data) != nbytes:
            raise InputError(f"{self.name} is truncated: its voxel data ends before its last slice.")
        return data

    def read(self, k0: int, k1: int) -> np.ndarray:
        """Slices k0..k1-1 as an array (n, rows, columns) in the file's voxel type."""
        if self._file is None or k0 < self._next:
            self._restart()
        if k0 > self._next:
            self._take((k0 - self._next) * self.slice_bytes)
        data = self._take((k1 - k0) * self.slice_bytes)
        self._next = k1
        if k1 == self.num_slices and self._stream is not None:
            nbytes = self.num_slices * self.slice_bytes
            layout = VoxelData(self.path, self.offset, "gzip", nbytes, self.slice_bytes)
            check_data_length(nbytes + self._stream.read_to_end(), layout, self.name)
        return np.frombuffer(data, dtype=self.dtype).reshape(k1 - k0, self.rows, self.columns)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            self._stream = None


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def header_value(value) -> str:
    """A key/value text for the NRRD header with backslash and line breaks escaped as the format
    specifies, so no value can add a header line; written as UTF-8, which ITK and Slicer read back."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class NrrdSlabWriter:
    """Writes a uint8 volume slab by slab into a gzip NRRD; the file appears only on `commit()`."""

    def __init__(self, path, geometry: Geometry, key_values: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.geometry = geometry
        self._staged = atomic_path(self.path)
        self._file = open(self._staged.tmp, "wb")
        d = geometry.direction_matrix * np.asarray(geometry.spacing)
        header = [
            "NRRD0004",
            "# Written by AnomalyFlag",
            "type: uint8",
            "dimension: 3",
            "space: left-posterior-superior",
            "sizes: {} {} {}".format(*geometry.size),
            "space directions: " + " ".join(_vector(d[:, a]) for a in range(3)),
            "kinds: domain domain domain",
            "endian: little",
            "encoding: gzip",
            "space origin: " + _vector(geometry.origin),
        ]
        header += [f"{header_value(k)}:={header_value(v)}" for k, v in (key_values or {}).items()]
        self._file.write(("\n".join(header) + "\n\n").encode("utf-8"))
        self._gzip = gzip.GzipFile(filename="", fileobj=self._file, mode="wb", compresslevel=1, mtime=0)
        self.written = 0

    def write(self, slab: np.ndarray) -> None:
        """Append k-slices (n, rows, columns) of uint8."""
        slab = np.ascontiguousarray(slab, dtype=np.uint8)
        self._gzip.write(slab.tobytes())
        self.written += slab.shape[0]

    def commit(self) -> Path:
        if self.written != self.geometry.size[2]:
            self.abort()
            raise ValueError(f"{self.path.name}: {self.written} of {self.geometry.size[2]} slices written")
        self._gzip.close()
        self._file.close()
        return self._staged.commit()

    def abort(self) -> None:
        try:
            self._gzip.close()
            self._file.close()
        finally:
            self._staged.abort()
