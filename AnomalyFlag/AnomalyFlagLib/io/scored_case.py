"""The scored-case format: one case's files, their names, the writer and the reader.

Files of case C in its folder: `C_slices.csv` (one row per slice), `C_heatmap.nrrd` (uint8 anomaly index
in the input's geometry), `C_summary.json` (what was scored, flags, file checksums), optional PNGs
(`C_flagged.png` montage, `C_slice<k>.png` snapshots); the review adds `C_review.json` (its sidecar),
`C_review.lock` and edited labels `C_seg_v<N>.seg.nrrd`. CaseFiles is the one place these names are
spelled; `score_cases` is the one writer (the CLI, the Slicer batch scoring and the benchmark call it) and
`read_scored_case` the one reader.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic_files import fsync_dir, process_alive, sha256_of, write_json_atomic, write_text_atomic
from ..errors import AnomalyFlagError, CancelledError, InputError, OutputError, SessionError
from ..geometry import Geometry
from ..orientation import AxialFrame
from ..results import HEATMAP_SCALE, CaseResult
from .nrrd_stream import NrrdSlabWriter

SLICES_SUFFIX = "_slices.csv"
SUMMARY_SUFFIX = "_summary.json"
SIDECAR_SUFFIX = "_review.json"
LABEL_SUFFIX = ".seg.nrrd"
HEATMAP_SCALE_KEY = "anomalyflag_scale"
"""The heatmap NRRD header field holding HEATMAP_SCALE."""
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


@dataclass(frozen=True)
class CaseFiles:
    """The paths of case `case`'s files in `folder`."""

    folder: Path
    case: str

    def __post_init__(self):
        object.__setattr__(self, "folder", Path(self.folder))
        if not self.case or any(sep in self.case for sep in ("/", "\\", os.sep)) or self.case in (".", ".."):
            raise InputError(f"case name '{self.case}' cannot be used in a file name.")

    def _named(self, suffix: str) -> Path:
        return self.folder / f"{self.case}{suffix}"

    @property
    def slices(self) -> Path:
        return self._named(SLICES_SUFFIX)

    @property
    def heatmap(self) -> Path:
        return self._named("_heatmap.nrrd")

    @property
    def summary(self) -> Path:
        return self._named(SUMMARY_SUFFIX)

    @property
    def montage(self) -> Path:
        return self._named("_flagged.png")

    def snapshot(self, index: int) -> Path:
        return self._named(f"_slice{int(index)}.png")

    @property
    def snapshot_pattern(self) -> "re.Pattern":
        return re.compile(rf"^{re.escape(self.case)}_slice\d+\.png$")

    @property
    def sidecar(self) -> Path:
        return self._named(SIDECAR_SUFFIX)

    @property
    def lock(self) -> Path:
        return self._named("_review.lock")

    def label_version(self, version: int) -> Path:
        if version < 1:
            raise ValueError(f"label versions start at 1, not {version}")
        return self._named(f"_seg_v{version}{LABEL_SUFFIX}")

    @property
    def label_version_pattern(self) -> "re.Pattern":
        return re.compile(rf"^{re.escape(self.case)}_seg_v(\d+){re.escape(LABEL_SUFFIX)}$")

    def score_outputs(self) -> dict:
        """{kind: path} of the files every scoring run writes."""
        return {"slices": self.slices, "heatmap": self.heatmap, "summary": self.summary}


def _cases_with(folder, suffix: str) -> List[str]:
    return sorted(p.name[: -len(suffix)] for p in Path(folder).glob(f"*{suffix}") if p.is_file())


def scored_cases(folder) -> List[str]:
    """Names of the cases with a summary in `folder` (a scored case is complete when its summary is there)."""
    return _cases_with(folder, SUMMARY_SUFFIX)


def reviewed_cases(folder) -> List[str]:
    """Names of the cases with a review sidecar in `folder`."""
    return _cases_with(folder, SIDECAR_SUFFIX)


def complete_outputs(folder, case: str, model_fingerprint: str, image) -> Optional[dict]:
    """The summary of case `case` in `folder` when its outputs are complete: written by the model with
    this fingerprint for this image, every file the summary lists present with its recorded SHA-256."""
    files = CaseFiles(folder, case)
    try:
        summary = json.loads(files.summary.read_text(encoding="utf-8"))
        listed = dict(summary["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if summary.get("model_fingerprint") != model_fingerprint or summary.get("image") != str(Path(image).resolve()):
        return None
    for name, digest in listed.items():
        path = files.folder / name
        if Path(name).name != name or not path.is_file() or sha256_of(path) != digest:
            return None
    return summary


def _finite_or_none(value) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_scored_case(folder, case: str) -> Tuple[dict, List[dict]]:
    """A scored case's summary and its slice rows (slice, z_mm, normalised, flagged, anomaly_fraction);
    a SessionError names what is missing, damaged or inconsistent."""
    files = CaseFiles(folder, case)
    if not files.summary.is_file():
        raise SessionError(
            f"no scoring outputs for case '{case}' in '{folder}' ({files.summary.name} is missing); "
            "score the case first."
        )
    try:
        summary = json.loads(files.summary.read_text(encoding="utf-8"))
        with open(files.slices, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionError(f"scoring outputs of case '{case}' in '{folder}' cannot be read: {exc}") from None
    if not isinstance(summary, dict) or "geometry" not in summary or "flagged_slices" not in summary:
        raise SessionError(f"'{files.summary}' is not an AnomalyFlag case summary.")
    try:
        table = [
            {
                "slice": int(r["index"]),
                "z_mm": float(r["z_mm"]),
                "normalised": _finite_or_none(r["normalised"]),
                "flagged": r["flagged"].strip() in ("1", "True", "true"),
                "anomaly_fraction": _finite_or_none(r.get("anomaly_fraction")),
            }
            for r in rows
        ]
    except (KeyError, ValueError, AttributeError) as exc:
        raise SessionError(f"'{files.slices}' is damaged: {exc}") from None
    flagged = sorted(r["slice"] for r in table if r["flagged"])
    if flagged != sorted(int(k) for k in summary["flagged_slices"]):
        raise SessionError(
            f"'{files.slices}' and '{files.summary}' disagree on the flagged slices; score the case again."
        )
    return summary, table


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
        HEATMAP_SCALE_KEY: repr(HEATMAP_SCALE),
        "anomalyflag_units": "anomaly_map/pixel_threshold",  # HEATMAP_UNITS, as NRRD keys are written
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
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


class CaseOutputs:
    """One case's output files, staged and then published as one set (see the module docstring).

    Use as a context manager: leaving it with an error discards what was staged and keeps the previous
    set; an OSError (full disk, no permission) becomes an OutputError naming the case and the folder.
    """

    def __init__(self, out_dir, case: str):
        self.out_dir = Path(out_dir)
        self.case = case
        self.files = CaseFiles(self.out_dir, case)
        self.final = self.files.score_outputs()
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
        `options` are Scorer.score's (roi, roi_labels, roi_margin_mm, progress, cancel, slice_keeper)."""
        from .slice_source import open_source

        source = open_source(image, name=f"volume '{image}'")
        key_values = heatmap_key_values(scorer.bundle.name, scorer.calibration.threshold)
        sink = NrrdHeatmapSink(self.path("heatmap"), source.geometry, key_values)
        return scorer.score(source, name=self.case, heatmap_sink=sink, **options)

    def publish(self, result: CaseResult, extra_summary: Optional[dict] = None) -> dict:
        """Write the CSV (and the heatmap when it was kept in memory) and the summary, replace the case's
        previous files by the new set, and return the summary as written (its "files" name the set)."""
        self.images = [name for name in self.images if (self.staging / name).is_file()]
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
        names = [p.name for p in self.final.values()] + [self.files.montage.name]
        try:
            names += json.loads(summary.read_text(encoding="utf-8"))["files"].get("images", [])
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass
        snapshot = self.files.snapshot_pattern
        names += [p.name for p in self.out_dir.iterdir() if snapshot.match(p.name)]
        mine = (n for n in dict.fromkeys(names) if isinstance(n, str) and n.startswith(f"{self.case}_"))
        paths = [summary] + [self.out_dir / n for n in mine if n != summary.name]
        return [p for p in paths if p.is_file() and p.parent == self.out_dir]


def write_case_files(result: CaseResult, out_dir, extra_summary: Optional[dict] = None) -> dict:
    """Publish a scored case kept in memory (heatmap included) as one set and return its summary; see
    CaseOutputs."""
    with CaseOutputs(prepare_output_dir(out_dir), result.name) as outputs:
        return outputs.publish(result, extra_summary)


@dataclass(frozen=True)
class ScoreOptions:
    """How `score_cases` scores each case: `roi` a file for one case or a folder of per-case files (see
    io.cases.roi_for_case) with its label values and margin, and whether to draw the montage."""

    roi: Optional[Path] = None
    roi_labels: Optional[Sequence[int]] = None
    roi_margin_mm: float = 10.0
    montage: bool = False
    resume: bool = False  # skip a case whose outputs by the same model for the same image are complete


@dataclass
class CaseOutcome:
    """One case of `score_cases`: its result and published summary, or the error that stopped it."""

    case: object  # io.cases.Case
    result: Optional[CaseResult] = None
    summary: Optional[dict] = None
    images: List[str] = field(default_factory=list)
    error: Optional[AnomalyFlagError] = None
    skipped: bool = False  # complete outputs were already there (ScoreOptions.resume)


ExtraImages = Callable[[object, CaseResult, CaseOutputs, Optional[Path]], None]


def score_cases(
    scorer,
    cases: Sequence,
    out_dir,
    options: ScoreOptions = ScoreOptions(),
    extra_images: Optional[ExtraImages] = None,
    progress: Optional[Callable[[int, object], Callable[[int, int], None]]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> Iterator[CaseOutcome]:
    """Score `cases` (io.cases.Case) into `out_dir`, publishing each case's files as one set, and yield
    one CaseOutcome per case as it finishes; a case that fails yields its error and the others go on.

    With `options.resume` a case whose outputs are complete (`complete_outputs`) is not scored again: its
    outcome has the summary on disk and `skipped`. `extra_images(case, result, outputs, roi)` may stage
    more PNGs of a case with flags (the Slicer snapshots); `progress(i, case)` gives the progress callback
    of the i-th case; cancel() stops with a CancelledError, finished cases keep their files.
    """
    from .cases import roi_for_case
    from .montage import MontageSlices, write_flagged_montage

    single = len(cases) == 1
    if options.roi and cases:
        roi_for_case(cases[0], options.roi, single)  # one ROI file for several cases fails here, once
    out_dir = prepare_output_dir(out_dir)
    for i, case in enumerate(cases):
        if cancel is not None and cancel():
            raise CancelledError(f"scoring was cancelled before case {case.name}.")
        done = options.resume and complete_outputs(out_dir, case.name, scorer.bundle.fingerprint(), case.image)
        if done:
            yield CaseOutcome(case, summary=done, images=list(done.get("files", {}).get("images", [])), skipped=True)
            continue
        try:
            with CaseOutputs(out_dir, case.name) as outputs:
                roi = roi_for_case(case, options.roi, single)
                kept = MontageSlices() if options.montage else None
                result = outputs.score(scorer, case.image, roi=roi, roi_labels=options.roi_labels,
                                       roi_margin_mm=options.roi_margin_mm, cancel=cancel, slice_keeper=kept,
                                       progress=progress(i, case) if progress is not None else None)  # fmt: skip
                if kept is not None:
                    write_flagged_montage(outputs.image_path(outputs.files.montage.name), kept, result,
                                          scorer.bundle.preprocess)  # fmt: skip
                if extra_images is not None and result.flagged_indices:
                    extra_images(case, result, outputs, roi)
                summary = outputs.publish(result, extra_summary={"image": str(Path(case.image).resolve())})
            yield CaseOutcome(case, result, summary, list(outputs.images))
        except CancelledError:
            raise
        except AnomalyFlagError as exc:
            yield CaseOutcome(case, error=exc)
