"""Review sessions: a reviewer steps through a case's flagged slices and accepts, recontours or skips each,
or confirms it abnormal (the flag was right: the slice shows an abnormality; such slices are the labelled
abnormal examples that class-supervised detectors learn from).

A session lives in a sidecar JSON `<case>_review.json` next to the case's scoring outputs
(`<case>_slices.csv`, `<case>_summary.json`). It is rewritten atomically after every decision (temporary
file in the same folder, flush, fsync, rename, fsync of the folder), so a crash loses at most the decision
being written. One writer at a time: `<case>_review.lock` names the holder, and a lock left by a dead
process on this host is taken over with a warning (see `lock`).

A sidecar written for another model or another image, a damaged sidecar, or one from a newer format is
refused with a SessionError and left exactly as it is. See SIDECAR_FORMAT for the file layout.
"""

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic_files import dumps_json, write_text_atomic
from ..errors import InputError, SessionError
from ..geometry import Geometry
from ..io.scored_case import CaseFiles, read_scored_case
from ..orientation import AxialFrame
from .lock import acquire_lock, describe_holder, read_lock, release_lock, utc_now

logger = logging.getLogger(__name__)

FORMAT = "anomalyflag-review"
FORMAT_VERSION = 2  # 2 added the "abnormal" decision; version 1 sidecars are read and saved as 2
DECISIONS = ("accepted", "recontoured", "skipped", "abnormal")
ORDERS = ("normalised", "roi", "auto")
CHANGE_KEYS = ("dice", "changed_voxels", "original_voxels", "edited_voxels")
SIDECAR_FORMAT = """\
{
  "format": "anomalyflag-review",   "format_version": 2,
  "case": "<case>",
  "created": "<UTC ISO time>",      "updated": "<UTC ISO time>",
  "model": {"name": "...", "fingerprint": "<bundle fingerprint from the summary>"},
  "image": {"path": "<source image, absolute, or null>",
            "geometry_sha256": "<hash of the scored grid: size, spacing, origin, direction>",
            "fingerprint": "<caller's content fingerprint, or 'geometry:<hash>'>",
            "fingerprint_kind": "content" | "geometry",
            "geometry": {...}},
  "scoring": {"summary_sha256": "<hash of the summary's stable fields>", "threshold": t,
              "num_slices": n, "roi": {...} | null},
  "original_segmentation": "<path or null>",
  "order": "normalised" | "roi",
  "queue": [{"slice": k, "normalised": s, "anomaly_fraction": f | null, "z_mm": z}, ...],
  "decisions": [{"slice": k, "decision": "accepted" | "recontoured" | "skipped" | "abnormal", "reviewer": "...",
                 "time": "<UTC ISO time>", "note": "...",
                 "change": {"dice": d, "changed_voxels": c, "original_voxels": o, "edited_voxels": e} | null,
                 "label": "<edited label version, relative to the sidecar's folder> | null"}, ...],
  "sessions": [{"reviewer": "...", "opened": "<UTC ISO time>", "host": "...", "pid": p}, ...]
}
"decisions" is a log in the order decisions were made; a slice's decision is its last record there."""


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def geometry_sha256(geometry: Union[dict, Geometry]) -> str:
    """Hash of a voxel grid (rounded so that float noise from a JSON round trip does not matter)."""
    g = geometry if isinstance(geometry, Geometry) else Geometry.from_dict(geometry)
    return _sha256_json(
        {
            "size": list(g.size),
            "spacing": [round(v, 5) for v in g.spacing],
            "origin": [round(v, 4) for v in g.origin],
            "direction": [round(v, 6) for v in g.direction],
        }
    )


def summary_sha256(summary: dict) -> str:
    """Hash of the summary fields that define the review queue (not timings or device)."""
    keys = ("case", "model_fingerprint", "threshold", "num_slices", "flagged_slices", "roi")
    data = {k: summary.get(k) for k in keys}
    data["geometry"] = geometry_sha256(summary["geometry"])
    return _sha256_json(data)


def image_fingerprint_of(image, geometry: Optional[Geometry] = None) -> str:
    """Content fingerprint of a volume (path, SimpleITK image, or (k, j, i) array with `geometry`):
    sha256 of the grid and the voxel bytes. Pass it to `ReviewSession.open(image_fingerprint=...)`."""
    import SimpleITK as sitk

    if isinstance(image, np.ndarray):
        if geometry is None:
            raise InputError("an array needs its geometry to be fingerprinted.")
        array = image
    else:
        if not isinstance(image, sitk.Image):
            from ..io.volumes import read_image

            image = read_image(image)
        geometry = Geometry.from_image(image)
        array = sitk.GetArrayViewFromImage(image)
    h = hashlib.sha256(geometry_sha256(geometry).encode())
    h.update(str(array.dtype).encode())
    array = np.ascontiguousarray(array)
    flat = array.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.size, step):
        h.update(flat[start : start + step].tobytes())
    return "sha256:" + h.hexdigest()


def _dumps(data: dict) -> str:
    """JSON (`dumps_json`) with one top-level key per line and one list item (queue entry, decision) per
    line."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            items = ",\n".join("  " + dumps_json(v) for v in value)
            lines.append(f" {dumps_json(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {dumps_json(key)}: {dumps_json(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json_durably(path: Path, data: dict) -> None:
    """Write the sidecar durably (see atomic_files.atomic_path)."""
    write_text_atomic(path, _dumps(data))


def slice_change(
    original_label: np.ndarray,
    edited_label: np.ndarray,
    slice_index: int,
    axis_frame: Union[AxialFrame, Geometry],
    labels: Optional[Sequence[int]] = None,
) -> dict:
    """How much an edit changed one slice: Dice and changed voxel count between the original and the
    edited label on slice `slice_index` (slice axis as in the scoring: `AxialFrame`, or a Geometry to
    derive it from). Both labels are (k, j, i) arrays on the same grid; a voxel is foreground when it is
    non-zero (or in `labels`). Two empty slices have Dice 1.0. The Dice is MONAI's (imported here, so that
    opening a review needs neither torch nor MONAI)."""
    try:
        import torch
        from monai.metrics import compute_dice
    except ImportError as exc:
        raise SessionError(
            f"measuring the change of a recontoured slice needs torch and MONAI, which are not installed ({exc}); "
            "install AnomalyFlag's dependencies first."
        ) from None

    original = np.asarray(original_label)
    edited = np.asarray(edited_label)
    if original.shape != edited.shape:
        raise InputError(f"the original label has shape {original.shape}, the edited one {edited.shape}.")
    if original.ndim != 3:
        raise InputError(f"labels must be 3D (k, j, i) arrays, not {original.ndim}D.")
    frame = AxialFrame.from_geometry(axis_frame) if isinstance(axis_frame, Geometry) else axis_frame
    a = frame.view(original)
    b = frame.view(edited)
    slice_index = int(slice_index)
    if not 0 <= slice_index < a.shape[0]:
        raise InputError(f"slice {slice_index} is outside the volume (0-{a.shape[0] - 1}).")
    a, b = a[slice_index], b[slice_index]
    if labels:
        ma, mb = np.isin(a, list(labels)), np.isin(b, list(labels))
    else:
        ma, mb = a != 0, b != 0
    # one-hot (background, foreground) with a float64 reference, so the Dice is computed in double precision
    edited_hot = torch.from_numpy(np.stack([~mb, mb])[None])
    original_hot = torch.from_numpy(np.stack([~ma, ma])[None].astype(np.float64))
    dice = compute_dice(edited_hot, original_hot, include_background=False, ignore_empty=False)
    return {
        "dice": float(dice),
        "changed_voxels": int(np.logical_xor(ma, mb).sum()),
        "original_voxels": int(ma.sum()),
        "edited_voxels": int(mb.sum()),
    }


# ----------------------------------------------------------------------------------------------------
# Case outputs -> queue


def build_queue(table: List[dict], order: str) -> List[dict]:
    """Flagged slices, most anomalous first: by normalised score, or by the anomalous share of the ROI
    ("roi"); ties by normalised score, then slice index."""
    flagged = [r for r in table if r["flagged"]]

    def neg(v):
        return -v if v is not None else math.inf

    if order == "roi":
        flagged.sort(key=lambda r: (neg(r["anomaly_fraction"]), neg(r["normalised"]), r["slice"]))
    else:
        flagged.sort(key=lambda r: (neg(r["normalised"]), r["slice"]))
    return [{k: r[k] for k in ("slice", "normalised", "anomaly_fraction", "z_mm")} for r in flagged]


def _resolve_order(order: str, summary: dict) -> str:
    if order not in ORDERS:
        raise InputError(f"review order must be one of {', '.join(ORDERS)}, not '{order}'.")
    if order == "auto":  # the organ-aware score already looks inside the segmentation
        roi = summary.get("roi")
        organ_aware = isinstance(roi, dict) and roi.get("score_kind") == "organ"
        return "roi" if roi and not organ_aware else "normalised"
    if order == "roi" and not summary.get("roi"):
        raise InputError(
            f"case '{summary.get('case')}' was scored without a segmentation, so it cannot be ordered by the "
            "anomalous share of the ROI; use order 'normalised'."
        )
    return order


# ----------------------------------------------------------------------------------------------------
# Lock file


def break_lock(case_dir, case: str) -> Optional[dict]:
    """Remove a case's review lock whatever its holder (after asking the user); returns the holder."""
    lock = CaseFiles(case_dir, case).lock
    holder = read_lock(lock)
    try:
        lock.unlink()
    except FileNotFoundError:
        return None
    logger.warning("review lock of case '%s' held by %s was removed", case, describe_holder(holder or {}))
    return holder


# ----------------------------------------------------------------------------------------------------
# Sidecar validation


def _damaged(path: Path, why: str) -> SessionError:
    return SessionError(
        f"the review sidecar '{path}' is damaged or not an AnomalyFlag review ({why}). It was left unchanged; "
        "move it aside to start a new review of this case."
    )


def _validate_sidecar(path: Path, raw: bytes, case: str) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _damaged(path, f"'format' is not '{FORMAT}'")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _damaged(path, "no valid 'format_version'")
    if version > FORMAT_VERSION:
        raise SessionError(
            f"the review sidecar '{path}' has format version {version}, written by a newer AnomalyFlag "
            f"(this one reads up to {FORMAT_VERSION}); update AnomalyFlag. The file was left unchanged."
        )
    if data.get("case") != case:
        raise _damaged(path, f"it belongs to case '{data.get('case')}', not '{case}'")
    try:
        queue_slices = {int(q["slice"]) for q in data["queue"]}
        for d in data["decisions"]:
            if d["decision"] not in DECISIONS or int(d["slice"]) not in queue_slices:
                raise ValueError(f"decision {d!r}")
            if not isinstance(d.get("reviewer"), str) or not isinstance(d.get("time"), str):
                raise ValueError(f"decision {d!r} without reviewer or time")
        data["model"]["fingerprint"]
        data["image"]["geometry_sha256"]
        data["scoring"]["summary_sha256"]
        sessions = data.get("sessions", [])
        if not isinstance(sessions, list) or not all(isinstance(x, dict) for x in sessions):
            raise ValueError("'sessions' is not a list of sessions")
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"missing or invalid entry: {exc}") from None
    return data


# ----------------------------------------------------------------------------------------------------
# The session


class ReviewSession:
    """One reviewer's session on one case; open with `ReviewSession.open(...)`, use as a context manager."""

    def __init__(self, case_dir: Path, case: str, reviewer: str, data: dict, lock_info: dict, summary: dict):
        self.case_dir = case_dir
        self.case = case
        self.reviewer = reviewer
        self.summary = summary
        self._data = data
        self._lock = lock_info
        paths = CaseFiles(case_dir, case)
        self.sidecar_path = paths.sidecar
        self.lock_path = paths.lock

    # -- opening --------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        case_dir,
        case: str,
        reviewer: str,
        model_fingerprint: Optional[str] = None,
        image_fingerprint: Optional[str] = None,
        order: str = "normalised",
        image_path=None,
        segmentation_path=None,
    ) -> "ReviewSession":
        """Start or resume the review of CASE from its scoring outputs in CASE_DIR.

        `model_fingerprint`: the loaded model's; must match the outputs (None: take the outputs').
        `image_fingerprint`: a content fingerprint of the image (`image_fingerprint_of`); the grid is
        always checked. `order`: "normalised", "roi" (anomalous share of the ROI; needs a case scored
        with a segmentation) or "auto". `image_path` / `segmentation_path`: the source image and the
        original segmentation, recorded for exporting training data.
        """
        case_dir = Path(case_dir)
        reviewer = str(reviewer or "").strip()
        if not reviewer:
            raise InputError("a review needs the reviewer's name.")
        if not case_dir.is_dir():
            raise SessionError(f"case output folder '{case_dir}' does not exist.")
        summary, table = read_scored_case(case_dir, case)
        order = _resolve_order(order, summary)
        outputs_model = summary.get("model_fingerprint")
        if model_fingerprint is not None and model_fingerprint != outputs_model:
            raise SessionError(
                f"case '{case}' in '{case_dir}' was scored by model {summary.get('model')} "
                f"(fingerprint {outputs_model}), not by the model in use (fingerprint {model_fingerprint}); "
                "score it again with this model before reviewing."
            )
        paths = CaseFiles(case_dir, case)
        lock_info = acquire_lock(paths.lock, case, reviewer)
        try:
            session = cls._open_locked(
                case_dir, case, reviewer, summary, table, order, outputs_model, image_fingerprint,
                image_path, segmentation_path, lock_info,
            )  # fmt: skip
        except BaseException:
            release_lock(paths.lock, lock_info["token"])
            raise
        return session

    @classmethod
    def _open_locked(cls, case_dir, case, reviewer, summary, table, order, model_fp, image_fp, image_path,
                     segmentation_path, lock_info) -> "ReviewSession":  # fmt: skip
        paths = CaseFiles(case_dir, case)
        sidecar = paths.sidecar
        for leftover in case_dir.glob(f".{sidecar.name}.tmp*"):  # from a writer that died mid-save
            try:
                leftover.unlink()
            except OSError:
                pass
        geometry_hash = geometry_sha256(summary["geometry"])
        digest = summary_sha256(summary)
        queue = build_queue(table, order)
        image_path = image_path or summary.get("image") or summary.get("source_image")
        image_path = str(Path(image_path).resolve()) if image_path else None
        now = utc_now()
        opened = {"reviewer": reviewer, "opened": now, "host": lock_info["host"], "pid": lock_info["pid"]}
        try:
            raw = sidecar.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise SessionError(f"the review sidecar '{sidecar}' cannot be read: {exc.strerror or exc}") from None
        if raw is None:
            data = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "case": case,
                "created": now,
                "updated": now,
                "model": {"name": summary.get("model"), "fingerprint": model_fp},
                "image": {
                    "path": image_path,
                    "geometry_sha256": geometry_hash,
                    "fingerprint": image_fp or f"geometry:{geometry_hash}",
                    "fingerprint_kind": "content" if image_fp else "geometry",
                    "geometry": summary["geometry"],
                },
                "scoring": {
                    "summary_sha256": digest,
                    "threshold": summary.get("threshold"),
                    "num_slices": summary.get("num_slices"),
                    "roi": summary.get("roi"),
                },
                "original_segmentation": str(Path(segmentation_path).resolve()) if segmentation_path else None,
                "order": order,
                "queue": queue,
                "decisions": [],
                "sessions": [opened],
            }
        else:
            data = _validate_sidecar(sidecar, raw, case)
            cls._check_matches(sidecar, data, case, summary, model_fp, image_fp, geometry_hash, digest)
            stored = {int(q["slice"]) for q in data["queue"]}
            if stored != {q["slice"] for q in queue}:
                raise _damaged(sidecar, "its queue does not match the case's flagged slices")
            data = json.loads(raw.decode("utf-8"))
            if data.get("order") != order:
                logger.info("review of %s: queue reordered by %s (was %s)", case, order, data.get("order"))
                data["order"] = order
                data["queue"] = queue
            if image_path:
                data["image"]["path"] = image_path
            if image_fp and data["image"].get("fingerprint_kind") != "content":
                data["image"]["fingerprint"] = image_fp
                data["image"]["fingerprint_kind"] = "content"
            if segmentation_path:
                data["original_segmentation"] = str(Path(segmentation_path).resolve())
            data.setdefault("sessions", []).append(opened)
            data["updated"] = now
        session = cls(case_dir, case, reviewer, data, lock_info, summary)
        session._save(data)  # proves the folder takes the sidecar before any decision is made
        return session

    @staticmethod
    def _check_matches(sidecar, data, case, summary, model_fp, image_fp, geometry_hash, digest):
        kept = "The sidecar was left unchanged; move it aside to start a new review."
        stored_model = data["model"]["fingerprint"]
        if stored_model != model_fp:
            raise SessionError(
                f"the review sidecar '{sidecar}' was written for another model (fingerprint {stored_model}, "
                f"{data['model'].get('name')}); the outputs of case '{case}' are from model "
                f"{summary.get('model')} (fingerprint {model_fp}). {kept}"
            )
        image = data["image"]
        if image["geometry_sha256"] != geometry_hash:
            g = image.get("geometry")
            was = Geometry.from_dict(g).describe() if isinstance(g, dict) else "another grid"
            raise SessionError(
                f"the review sidecar '{sidecar}' was written for another image ({was}); case '{case}' now has "
                f"{Geometry.from_dict(summary['geometry']).describe()}. {kept}"
            )
        if image_fp and image.get("fingerprint_kind") == "content" and image.get("fingerprint") != image_fp:
            raise SessionError(
                f"the review sidecar '{sidecar}' was written for another image (content fingerprint "
                f"{image.get('fingerprint')}, this image has {image_fp}). {kept}"
            )
        if data["scoring"]["summary_sha256"] != digest:
            raise SessionError(
                f"case '{case}' was scored again since the review in '{sidecar}' began (threshold, ROI or "
                f"flagged slices changed), so its queue no longer matches. {kept}"
            )

    # -- state ----------------------------------------------------------------------------------------

    @property
    def data(self) -> dict:
        """A copy of the sidecar content."""
        return json.loads(json.dumps(self._data))

    @property
    def order(self) -> str:
        return self._data["order"]

    @property
    def model_fingerprint(self) -> str:
        return self._data["model"]["fingerprint"]

    @property
    def image_path(self) -> Optional[str]:
        return self._data["image"].get("path")

    @property
    def queue(self) -> List[dict]:
        """Flagged slices in review order: {slice, normalised, anomaly_fraction, z_mm}."""
        return [dict(q) for q in self._data["queue"]]

    @property
    def decisions(self) -> Dict[int, dict]:
        """Each decided slice's current decision record."""
        out = {}
        for record in self._data["decisions"]:
            out[int(record["slice"])] = dict(record)
        return out

    @property
    def history(self) -> List[dict]:
        """Every decision record, oldest first."""
        return [dict(r) for r in self._data["decisions"]]

    def decision_for(self, slice_index: int) -> Optional[dict]:
        return self.decisions.get(int(slice_index))

    def progress(self) -> Tuple[int, int]:
        """(reviewed, total) slices of the queue."""
        decided = self.decisions
        return sum(1 for q in self._data["queue"] if q["slice"] in decided), len(self._data["queue"])

    def pending(self) -> List[dict]:
        decided = self.decisions
        return [dict(q) for q in self._data["queue"] if q["slice"] not in decided]

    def next_pending(self) -> Optional[dict]:
        """The first undecided slice in review order, or None when the review is complete."""
        pending = self.pending()
        return pending[0] if pending else None

    @property
    def complete(self) -> bool:
        reviewed, total = self.progress()
        return reviewed == total

    # -- changes --------------------------------------------------------------------------------------

    def decide(self, slice_index: int, decision: str, note: str = "", change: Optional[dict] = None,
               label_path=None) -> dict:  # fmt: skip
        """Record a decision on a queued slice and save the sidecar before returning.

        `change` (for "recontoured"): `slice_change(...)`'s dict. `label_path`: the edited label
        version the change was saved in (stored relative to the sidecar's folder). Deciding a slice again
        replaces its decision."""
        slice_index = int(slice_index)
        if decision not in DECISIONS:
            raise InputError(f"decision must be one of {', '.join(DECISIONS)}, not '{decision}'.")
        if slice_index not in {q["slice"] for q in self._data["queue"]}:
            raise InputError(f"slice {slice_index} of case '{self.case}' is not in the review queue.")
        if change is not None:
            if decision != "recontoured":
                raise InputError("a change measure belongs to a 'recontoured' decision only.")
            missing = [k for k in CHANGE_KEYS if k not in change]
            if missing:
                raise InputError(f"the change measure lacks {', '.join(missing)}.")
            change = {
                "dice": float(change["dice"]),
                "changed_voxels": int(change["changed_voxels"]),
                "original_voxels": int(change["original_voxels"]),
                "edited_voxels": int(change["edited_voxels"]),
            }
        label = None
        if label_path is not None:
            label_path = Path(label_path)  # relative paths are relative to the working directory
            try:
                label = os.path.relpath(label_path.resolve(), self.case_dir.resolve()).replace(os.sep, "/")
            except ValueError:  # another drive on Windows
                label = str(label_path.resolve())
        record = {
            "slice": slice_index,
            "decision": decision,
            "reviewer": self.reviewer,
            "time": utc_now(),
            "note": str(note or ""),
            "change": change,
            "label": label,
        }
        data = dict(self._data)
        data["decisions"] = self._data["decisions"] + [record]
        data["updated"] = record["time"]
        self._save(data)
        return dict(record)

    def undo_last(self) -> Optional[dict]:
        """Withdraw the most recent decision (a decision it replaced comes back); returns it, or None."""
        if not self._data["decisions"]:
            return None
        data = dict(self._data)
        data["decisions"] = self._data["decisions"][:-1]
        data["updated"] = utc_now()
        removed = self._data["decisions"][-1]
        self._save(data)
        return dict(removed)

    def _save(self, data: dict) -> None:
        """Write `data` as the sidecar; the in-memory state changes only when the file was written."""
        if self._lock is None:
            raise SessionError(f"the review session of case '{self.case}' is closed.")
        holder = read_lock(self.lock_path)
        if not holder or holder.get("token") != self._lock["token"]:
            raise SessionError(
                f"the review lock '{self.lock_path}' of case '{self.case}' was removed or taken over by "
                f"{describe_holder(holder) if holder else 'nobody'}; this change was not saved."
            )
        data = {**data, "format_version": FORMAT_VERSION}
        try:
            write_json_durably(self.sidecar_path, data)
        except (OSError, ValueError) as exc:
            raise SessionError(
                f"the review of case '{self.case}' could not be saved to '{self.sidecar_path}' "
                f"({getattr(exc, 'strerror', None) or exc}); the last change was not recorded."
            ) from None
        self._data = data

    # -- closing --------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._lock is None

    def close(self) -> None:
        """Release the lock (the sidecar stays). Safe to call twice."""
        if self._lock is not None:
            release_lock(self.lock_path, self._lock["token"])
            self._lock = None

    def __enter__(self) -> "ReviewSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        reviewed, total = self.progress()
        state = "closed" if self.closed else "open"
        return f"<ReviewSession {self.case} by {self.reviewer}: {reviewed}/{total} reviewed, {state}>"


def load_sidecar(case_dir, case: str) -> Optional[dict]:
    """Read a case's review sidecar without opening a session (no lock): None when there is none."""
    path = CaseFiles(case_dir, case).sidecar
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SessionError(f"the review sidecar '{path}' cannot be read: {exc.strerror or exc}") from None
    return _validate_sidecar(path, raw, case)


def current_decisions(data: dict) -> Dict[int, dict]:
    """Each slice's current decision from sidecar content (`load_sidecar`)."""
    out = {}
    for record in data.get("decisions", []):
        out[int(record["slice"])] = record
    return out
