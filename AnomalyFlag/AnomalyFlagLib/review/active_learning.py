"""Active learning: which scans to label first (a worklist ranked by anomaly), and the recontoured cases
as training data for the segmentation model (a MONAI-style datalist).

Worklist ranking, most anomalous first: highest maximum normalised slice score, then more flagged slices,
then a higher mean anomalous share (of the body or ROI) over the flagged slices, then the case name, so
the order is the same on every run.
"""

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..atomic_files import write_json_atomic, write_text_atomic
from ..errors import InputError, SessionError
from ..io.scored_case import SIDECAR_SUFFIX, SUMMARY_SUFFIX, CaseFiles, read_scored_case, reviewed_cases, scored_cases
from .label_versions import latest_version
from .session import current_decisions, load_sidecar, utc_now

logger = logging.getLogger(__name__)

WORKLIST_NAME = "worklist.csv"
WORKLIST_COLUMNS = (
    "rank", "case", "max_normalised_score", "flagged_slices", "mean_anomaly_fraction", "num_slices", "case_path",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Worklist


def scored_case_names(outputs_dir) -> List[str]:
    """Cases with complete scoring outputs (a summary JSON) in OUTPUTS_DIR, sorted by name."""
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        raise InputError(f"scores folder '{outputs_dir}' does not exist.")
    return scored_cases(outputs_dir)


def case_metrics(outputs_dir, case: str) -> dict:
    """A scored case's ranking figures from its summary and slice table."""
    try:
        summary, table = read_scored_case(outputs_dir, case)
    except SessionError as exc:
        raise InputError(str(exc)) from None
    scores = [r["normalised"] for r in table if r["normalised"] is not None]
    flagged = [r for r in table if r["flagged"]]
    fractions = [r["anomaly_fraction"] for r in flagged if r["anomaly_fraction"] is not None]
    return {
        "case": case,
        "max_normalised_score": max(scores) if scores else -math.inf,
        "flagged_slices": len(flagged),
        "mean_anomaly_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
        "num_slices": len(table),
        "model_fingerprint": summary.get("model_fingerprint"),
        "summary": summary,
    }


def _rank_key(m: dict):
    return (-m["max_normalised_score"], -m["flagged_slices"], -m["mean_anomaly_fraction"], m["case"])


def rank_cases(outputs_dir, case_paths: Optional[Dict[str, str]] = None, images_dir=None,
               cases: Optional[List[str]] = None) -> List[dict]:  # fmt: skip
    """Worklist rows (see WORKLIST_COLUMNS) for every scored case in OUTPUTS_DIR (or only `cases`), most
    anomalous first. `case_paths` {case: source path} fills the case_path column, else the sources
    recorded with the outputs or found in `images_dir`."""
    names = scored_case_names(outputs_dir)
    if cases is not None:
        names = [n for n in names if n in set(cases)]
    if not names:
        raise InputError(f"scores folder '{outputs_dir}' holds no scored cases (*{SUMMARY_SUFFIX}).")
    metrics = [case_metrics(outputs_dir, name) for name in names]
    fingerprints = sorted({str(m["model_fingerprint"]) for m in metrics})
    if len(fingerprints) > 1:
        logger.warning("scores in %s come from %d models (%s); their scores are not comparable",
                       outputs_dir, len(fingerprints), ", ".join(fingerprints))  # fmt: skip
    paths = dict(case_paths or {})
    found = _source_paths(outputs_dir, images_dir, [n for n in names if n not in paths])
    rows = []
    for rank, m in enumerate(sorted(metrics, key=_rank_key), start=1):
        path = paths.get(m["case"]) or found.get(m["case"])
        rows.append(
            {
                "rank": rank,
                "case": m["case"],
                "max_normalised_score": m["max_normalised_score"],
                "flagged_slices": m["flagged_slices"],
                "mean_anomaly_fraction": m["mean_anomaly_fraction"],
                "num_slices": m["num_slices"],
                "case_path": str(path) if path else "",
            }
        )
    return rows


def worklist_csv(rows: List[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(WORKLIST_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r["rank"],
                r["case"],
                f"{r['max_normalised_score']:.6g}",
                r["flagged_slices"],
                f"{r['mean_anomaly_fraction']:.6g}",
                r["num_slices"],
                r["case_path"],
            ]
        )
    return buf.getvalue()


def write_worklist(rows: List[dict], path) -> Path:
    return write_text_atomic(path, worklist_csv(rows))


def read_worklist(path) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------
# Where the source images are


def _images_in(images_dir) -> Dict[str, Path]:
    if not images_dir:
        return {}
    from ..io.cases import discover_cases

    return {c.name: c.image for c in discover_cases(images_dir, "images folder")}


def _source_paths(outputs_dir, images_dir, names) -> Dict[str, Path]:
    """Source image of each case: recorded in the review sidecar or the summary, listed in a worklist
    in OUTPUTS_DIR, or found by name in IMAGES_DIR."""
    outputs_dir = Path(outputs_dir)
    out: Dict[str, Path] = {}
    worklist = {}
    if (outputs_dir / WORKLIST_NAME).is_file():
        try:
            worklist = {r["case"]: r.get("case_path") for r in read_worklist(outputs_dir / WORKLIST_NAME)}
        except (OSError, KeyError, csv.Error):
            worklist = {}
    in_folder = None
    for name in names:
        candidates = []
        try:
            sidecar = load_sidecar(outputs_dir, name)
        except SessionError:
            sidecar = None
        if sidecar:
            candidates.append(sidecar["image"].get("path"))
        summary_path = CaseFiles(outputs_dir, name).summary
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            candidates += [summary.get("image"), summary.get("source_image")]
        except (OSError, ValueError, AttributeError):
            pass
        candidates.append(worklist.get(name))
        for c in candidates:
            if c and Path(c).exists():
                out[name] = Path(c)
                break
        else:
            if images_dir:
                if in_folder is None:
                    in_folder = _images_in(images_dir)
                if name in in_folder:
                    out[name] = in_folder[name]
    return out


# ----------------------------------------------------------------------------------------------------
# Training datalist from recontoured cases


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), start.resolve()).replace(os.sep, "/")
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def export_training_datalist(outputs_dir, output_json, images_dir=None) -> dict:
    """Write a MONAI-style datalist of every reviewed case with at least one "recontoured" decision:
    {"training": [{"image", "label", ...}], "metadata": {...}}, paths relative to the JSON's folder.
    The label is the case's newest edited version (`<case>_seg_v{N}.seg.nrrd`). Cases that cannot be
    exported (no saved edit, image not found, damaged sidecar) are listed under metadata.skipped; when
    none can be, an InputError says why and nothing is written. Returns the datalist."""
    outputs_dir = Path(outputs_dir)
    output_json = Path(output_json)
    if not outputs_dir.is_dir():
        raise InputError(f"outputs folder '{outputs_dir}' does not exist.")
    cases = reviewed_cases(outputs_dir)
    if not cases:
        raise InputError(f"outputs folder '{outputs_dir}' holds no review sessions (*{SIDECAR_SUFFIX}).")
    base = output_json.parent if str(output_json.parent) else Path(".")
    base.mkdir(parents=True, exist_ok=True)
    entries, skipped = [], []
    reviewers, fingerprints = set(), set()
    decisions_total = recontoured_total = cases_reviewed = 0
    found_images = None
    for case in cases:
        try:
            data = load_sidecar(outputs_dir, case)
        except SessionError as exc:
            skipped.append({"case": case, "reason": str(exc)})
            continue
        decided = current_decisions(data)
        cases_reviewed += 1
        recontoured = sorted(k for k, d in decided.items() if d["decision"] == "recontoured")
        if not recontoured:
            continue
        label = latest_version(outputs_dir, case)
        if label is None:
            recorded = [d.get("label") for d in data["decisions"] if d.get("label")]
            if recorded and (outputs_dir / recorded[-1]).is_file():
                label = outputs_dir / recorded[-1]
        if label is None:
            skipped.append({"case": case, "reason": "recontoured, but no edited segmentation version was saved"})
            continue
        image = _source_paths(outputs_dir, None, [case]).get(case)
        if image is None and images_dir:
            if found_images is None:
                found_images = _images_in(images_dir)
            image = found_images.get(case)
        if image is None:
            skipped.append({"case": case, "reason": "source image not recorded or not found; pass --images DIR"})
            continue
        case_reviewers = sorted({d["reviewer"] for d in decided.values()})
        reviewers.update(case_reviewers)
        fingerprints.add(data["model"]["fingerprint"])
        decisions_total += len(decided)
        recontoured_total += len(recontoured)
        entries.append(
            {
                "image": _relative(image, base),
                "label": _relative(label, base),
                "case": case,
                "recontoured_slices": recontoured,
                "decisions": len(decided),
                "reviewers": case_reviewers,
                "model_fingerprint": data["model"]["fingerprint"],
            }
        )
    if not entries:
        reasons = "; ".join(f"{s['case']}: {s['reason']}" for s in skipped)
        raise InputError(
            f"no recontoured case in '{outputs_dir}' can be exported ({cases_reviewed} reviewed)"
            f"{': ' + reasons if reasons else ''}; '{output_json}' was not written."
        )
    datalist = {
        "training": entries,
        "metadata": {
            "created": utc_now(),
            "source": _relative(outputs_dir, base),
            "cases_reviewed": cases_reviewed,
            "cases_exported": len(entries),
            "reviewers": sorted(reviewers),
            "decisions": decisions_total,
            "recontoured_slices": recontoured_total,
            "model_fingerprint": sorted(fingerprints)[0] if len(fingerprints) == 1 else sorted(fingerprints),
            "label_format": "Slicer .seg.nrrd on the image grid: segments as label values (Segment<N>_* header fields)",
            "skipped": skipped,
        },
    }
    write_json_atomic(output_json, datalist)
    return datalist


# ----------------------------------------------------------------------------------------------------
# Confirmed abnormal slices, as labelled training examples


def confirmed_abnormal_slices(outputs_dir) -> Optional[Dict[Path, List[int]]]:
    """{source image: slice indices decided "abnormal"} of the reviewed cases in OUTPUTS_DIR, or None when
    the folder holds no review session. An InputError says why when sessions exist but none confirms a
    slice, or when a case with confirmed slices has no source image on record."""
    outputs_dir = Path(outputs_dir)
    cases = reviewed_cases(outputs_dir) if outputs_dir.is_dir() else []
    if not cases:
        return None
    found: Dict[Path, List[int]] = {}
    for case in cases:
        abnormal = sorted(k for k, d in current_decisions(load_sidecar(outputs_dir, case)).items()
                          if d["decision"] == "abnormal")  # fmt: skip
        if not abnormal:
            continue
        image = _source_paths(outputs_dir, None, [case]).get(case)
        if image is None:
            raise InputError(f"case '{case}' in '{outputs_dir}' has slices confirmed abnormal but its source image "
                             "is not recorded or not found.")  # fmt: skip
        found[Path(image)] = abnormal
    if not found:
        raise InputError(f"no slice of the {len(cases)} reviewed case(s) in '{outputs_dir}' is confirmed abnormal "
                         "(decision 'abnormal', key X in the module).")  # fmt: skip
    return found
