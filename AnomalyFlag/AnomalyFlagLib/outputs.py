"""Per-case output files: slice table (CSV), heatmap (NRRD) and summary (JSON), written atomically.

The summary is written last: a case folder with a summary JSON is complete.
"""

import csv
import io
import json
import math
from pathlib import Path

from .atomic_files import write_text_atomic
from .scoring import HEATMAP_SCALE, CaseResult


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(_clean(data), indent=2) + "\n")


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


def write_case_files(result: CaseResult, out_dir, extra_summary: dict = None) -> dict:
    """Write the CSV and the summary (after the heatmap, which the scorer's sink wrote or we write now)."""
    paths = case_paths(out_dir, result.name)
    if result.heatmap is not None:
        from .volume_io import write_image_atomic

        image = result.heatmap_image()
        for key, value in heatmap_key_values(result.model_name, result.threshold).items():
            image.SetMetaData(key, value)
        write_image_atomic(image, paths["heatmap"])
    write_text_atomic(paths["slices"], slices_csv(result))
    summary = result.summary()
    summary["files"] = {k: p.name for k, p in paths.items()}
    summary.update(extra_summary or {})
    write_json(paths["summary"], summary)
    return paths
