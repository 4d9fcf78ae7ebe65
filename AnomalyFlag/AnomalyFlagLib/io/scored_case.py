"""Per-case output files: slice table (CSV), heatmap (NRRD), summary (JSON) and optional PNGs.

A case's files are written into a hidden staging folder beside them and published as one set: the
previous run's files of the case are removed (its summary first), then the new ones moved in (the
summary last). A crash at any point leaves the files of one run only, and a case whose summary is
there is complete; the summary lists every file with its SHA-256. Leftovers of killed runs (staging
folders, partial files) are removed when the next run prepares the folder.
"""

import csv
import errno
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..atomic_files import fsync_dir, sha256_of, write_json_atomic, write_text_atomic
from ..errors import OutputError
from ..geometry import Geometry
from ..orientation import AxialFrame
from ..results import HEATMAP_SCALE, CaseResult
from .nrrd_stream import NrrdSlabWriter

STAGING_PREFIX = ".staging"
_WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_LEFTOVER = re.compile(r"^\.(?:.+\.(?:part|tmp)|staging)(\d+)")


class ArrayHeatmapSink:
    """Keeps the heatmap in memory as uint8 in the input's (k, j, i) layout."""

    def __init__(self, geometry: Geometry):
        self.array = np.zeros(geometry.size[::-1], dtype=np.uint8)
        self.view = AxialFrame.from_geometry(geometry).view(self.array)

    def write(self, k0: int, oriented: np.ndarray) -> None:
        self.view[k0 : k0 + oriented.shape[0]] = oriented

    def finish(self):
        return self.array

    def abort(self):
        pass


class NrrdHeatmapSink:
    """Writes the heatmap to a gzip NRRD as it comes; the file appears complete or not at all."""

    def __init__(self, path, geometry: Geometry, key_values: Dict[str, str]):
        self.frame = AxialFrame.from_geometry(geometry)
        self.geometry = geometry
        self.memory = None if self.frame.slices_along_k else ArrayHeatmapSink(geometry)
        self.writer = NrrdSlabWriter(path, geometry, key_values)

    def write(self, k0: int, oriented: np.ndarray) -> None:
        if self.memory is not None:
            self.memory.write(k0, oriented)
        else:
            self.writer.write(self.frame.unorient_slab(oriented))

    def finish(self):
        if self.memory is not None:
            for k0 in range(0, self.geometry.size[2], 32):
                self.writer.write(self.memory.array[k0 : k0 + 32])
        return self.writer.commit()

    def abort(self):
        self.writer.abort()


def case_paths(out_dir, case: str) -> dict:
    out_dir = Path(out_dir)
    return {
        "slices": out_dir / f"{case}_slices.csv",
        "heatmap": out_dir / f"{case}_heatmap.nrrd",
        "summary": out_dir / f"{case}_summary.json",
    }


def slices_csv(result: CaseResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = result.slices.names
    writer.writerow(names)
    for row in result.slices.rows():
        out = []
        for c in names:
            v = row[c]
            if isinstance(v, bool):
                out.append(int(v))
            elif isinstance(v, float):
                out.append("" if not math.isfinite(v) else f"{v:.6g}")
            else:
                out.append(v)
        writer.writerow(out)
    return buf.getvalue()


def heatmap_key_values(result_or_model: str, threshold: float) -> dict:
    return {
        "anomalyflag_scale": repr(HEATMAP_SCALE),
        "anomalyflag_units": "anomaly_map/pixel_threshold",
        "anomalyflag_model": result_or_model,
        "anomalyflag_threshold": repr(threshold),
    }


def prepare_output_dir(path, what: str = "output folder") -> Path:
    """Create the folder (and its parents), refusing with a named reason where that is impossible, and
    remove what killed runs left in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} '{path}' is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test{os.getpid()}.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{what} '{path}' cannot be written: {exc.strerror or exc}.") from None
    remove_leftovers(path)
    return path


def remove_leftovers(folder: Path) -> List[Path]:
    """Remove staging folders and partial files of AnomalyFlag processes that no longer run."""
    removed = []
    for entry in Path(folder).iterdir():
        match = _LEFTOVER.match(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class CaseOutputs:
    """One case's output files, staged and then published as one set (see the module docstring).

    Use as a context manager: leaving it with an error discards what was staged and keeps the previous
    set; an OSError (full disk, no permission) becomes an OutputError naming the case and the folder.
    """

    def __init__(self, out_dir, case: str):
        self.out_dir = Path(out_dir)
        self.case = case
        self.final = case_paths(self.out_dir, case)
        self.staging = self.out_dir / f"{STAGING_PREFIX}{os.getpid()}.{case}"
        self.images: List[str] = []

    def __enter__(self) -> "CaseOutputs":
        try:
            self.staging.mkdir()
        except OSError as exc:
            raise self._error(exc) from None
        return self

    def __exit__(self, kind, exc, tb):
        shutil.rmtree(self.staging, ignore_errors=True)
        if isinstance(exc, OSError) and self._is_ours(exc):
            raise self._error(exc) from None
        return False

    def _is_ours(self, exc: OSError) -> bool:
        """Whether an OSError is about writing the outputs (a full disk, or a file in the output folder)."""
        if exc.errno in _WRITE_ERRORS:
            return True
        return exc.filename is not None and Path(str(exc.filename)).resolve().parent in (
            self.out_dir.resolve(),
            self.staging.resolve(),
        )

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(
            f"the outputs of case '{self.case}' cannot be written to '{self.out_dir}': {exc.strerror or exc}."
        )

    def path(self, kind: str) -> Path:
        """Where to write the file of `kind` (slices, heatmap) before it is published."""
        return self.staging / self.final[kind].name

    def image_path(self, filename: str) -> Path:
        """Where to write an extra PNG of the case (montage, snapshot), published with the rest."""
        if not filename.startswith(f"{self.case}_"):
            raise ValueError(f"'{filename}' is not named after case '{self.case}'")
        self.images.append(filename)
        return self.staging / filename

    def score(self, scorer, image, **options) -> CaseResult:
        """Score the volume at `image` with a Scorer, streaming its heatmap into the staging folder;
        `options` are Scorer.score's (roi, roi_labels, roi_margin_mm, progress, cancel)."""
        from .slice_source import open_source

        source = open_source(image, name=f"volume '{image}'")
        key_values = heatmap_key_values(scorer.bundle.name, scorer.calibration.threshold)
        sink = NrrdHeatmapSink(self.path("heatmap"), source.geometry, key_values)
        return scorer.score(source, name=self.case, heatmap_sink=sink, **options)

    def publish(self, result: CaseResult, extra_summary: Optional[dict] = None) -> dict:
        """Write the CSV (and the heatmap when it was kept in memory) and the summary, replace the case's
        previous files by the new set, and return the summary as written (its "files" name the set)."""
        if result.heatmap is not None:
            from .volumes import write_image_atomic

            image = result.heatmap_image()
            for key, value in heatmap_key_values(result.model_name, result.threshold).items():
                image.SetMetaData(key, value)
            write_image_atomic(image, self.path("heatmap"))
        write_text_atomic(self.path("slices"), slices_csv(result))
        kinds = [k for k in ("slices", "heatmap") if self.path(k).is_file()]
        names = [self.final[k].name for k in kinds] + self.images
        summary = result.summary()
        summary["files"] = {k: self.final[k].name for k in kinds + ["summary"]}
        if self.images:
            summary["files"]["images"] = list(self.images)
        summary["sha256"] = {name: sha256_of(self.staging / name) for name in names}
        summary.update(extra_summary or {})
        write_json_atomic(self.path("summary"), summary)
        for old in self._published():
            old.unlink()
        for name in names + [self.final["summary"].name]:
            os.replace(self.staging / name, self.out_dir / name)
        fsync_dir(self.out_dir)
        return summary

    def _published(self) -> List[Path]:
        """The case's score outputs now on disk, its summary first."""
        summary = self.final["summary"]
        names = [p.name for p in self.final.values()] + [f"{self.case}_flagged.png"]
        try:
            names += json.loads(summary.read_text(encoding="utf-8"))["files"].get("images", [])
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass
        snapshot = re.compile(rf"^{re.escape(self.case)}_slice\d+\.png$")
        names += [p.name for p in self.out_dir.iterdir() if snapshot.match(p.name)]
        mine = (n for n in dict.fromkeys(names) if isinstance(n, str) and n.startswith(f"{self.case}_"))
        paths = [summary] + [self.out_dir / n for n in mine if n != summary.name]
        return [p for p in paths if p.is_file() and p.parent == self.out_dir]


def write_case_files(result: CaseResult, out_dir, extra_summary: Optional[dict] = None) -> dict:
    """Publish a scored case kept in memory (heatmap included) as one set and return its summary; see
    CaseOutputs."""
    with CaseOutputs(prepare_output_dir(out_dir), result.name) as outputs:
        return outputs.publish(result, extra_summary)
