"""Where the deployed segmentation model fails, slice by slice, and how well a slice score predicts it.

The automatic contour (``<case>_seg``) is compared with a reference contour (``<case>_reference``) on each
axial slice (the scorer's slice axis, `orientation.AxialFrame`); a slice whose automatic contour is poor
is a *failed* slice (`FailureRule`). `failure_metrics` measures any per-slice score against those
failures: how well it ranks them (AUROC, AUPRC), the risk-coverage curve and its area (AURC), and what
recontouring the flagged slices would give back (mean Dice before and after).

Dice and the surface distance are computed here with numpy and SimpleITK (its Maurer distance map), not
MONAI: MONAI's surface distance needs scipy, which is not a dependency. No torch: only the AUROC and AUPRC
(MONAI's, as for the anomaly metrics) and placing label files on the image grid (`roi.roi_on_image_grid`)
import it, when called.

Conventions
-----------
- A slice where both contours are empty is a perfect slice: Dice 1.0, never a failure. Mean Dice over
  slices counts such slices (as 1.0), so it depends on how far the scan reaches beyond the structure.
- The surface distance of a slice is NaN when either contour is empty on it (there is no surface pair).
- A slice is *flagged* by whatever the caller says (for the scorer, ``score > threshold`` inside its ROI).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from ..orientation import AxialFrame
from .metrics import (
    _as_bool,
    _as_scores,
    _check_same_length,
    _monai_binary_metric,
    _runs,
    empty_panel,
    finish_report_figure,
    new_report_figure,
)

__all__ = [
    "FailureRule",
    "failed_slices",
    "failure_metrics",
    "risk_coverage",
    "slice_dice",
    "write_failure_png",
]

SLICE_COLUMNS = ("dice", "automatic_voxels", "reference_voxels", "intersection_voxels", "surface_distance_mm")


# ----------------------------------------------------------------------------------------------------------
# Per-slice comparison of two contours
# ----------------------------------------------------------------------------------------------------------


def _on_grid(contour: Any, geometry: Optional[Geometry], labels: Optional[Sequence[int]], name: str) -> np.ndarray:
    """A (k, j, i) bool mask: an array as it is (label values `labels`, else non-zero), or a file or
    SimpleITK image placed on the image grid of `geometry`."""
    if isinstance(contour, np.ndarray):
        if contour.ndim != 3:
            raise InputError(f"{name} must be a 3D (k, j, i) array, got shape {contour.shape}.")
        if geometry is not None and tuple(contour.shape[::-1]) != tuple(geometry.size):
            raise InputError(f"{name} has shape {contour.shape}, the image has {tuple(geometry.size)[::-1]} (k, j, i).")
        if contour.dtype == bool and not labels:
            return contour
        return np.isin(contour, list(labels)) if labels else contour != 0
    if geometry is None:
        raise InputError(f"{name} is a file or image: placing it on the image grid needs the image's Geometry.")
    from ..roi import roi_on_image_grid  # imports torch (the ROI slabs); only needed for files

    return roi_on_image_grid(contour, geometry, labels, name=name, allow_empty=True)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Contour pixels of each (row, column) slice of a (slice, row, column) mask: pixels with a 4-neighbour
    outside the mask; pixels on the slice's border count as contour (outside the slice is background)."""
    inner = mask.copy()
    inner[:, 1:, :] &= mask[:, :-1, :]
    inner[:, :-1, :] &= mask[:, 1:, :]
    inner[:, :, 1:] &= mask[:, :, :-1]
    inner[:, :, :-1] &= mask[:, :, 1:]
    inner[:, 0, :] = inner[:, -1, :] = False
    inner[:, :, 0] = inner[:, :, -1] = False
    return mask & ~inner


def _distance_to(points: np.ndarray, spacing_rc) -> np.ndarray:
    """Euclidean distance (mm) of every pixel of a 2D (row, column) grid to the nearest True pixel."""
    image = sitk.GetImageFromArray(points.astype(np.uint8))
    image.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0])))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.where(points, 0.0, np.abs(sitk.GetArrayFromImage(distance).astype(np.float64)))


def _mean_surface_distance(edge_a: np.ndarray, edge_b: np.ndarray, spacing_rc) -> float:
    """Mean symmetric surface distance of two non-empty 2D contours: the mean over the contour pixels of
    both of the distance to the other contour (as MONAI's ``compute_average_surface_distance(symmetric=True)``)."""
    rows, columns = np.nonzero(edge_a | edge_b)  # the distances are exact inside the box holding both
    box = (slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))
    a, b = edge_a[box], edge_b[box]
    total = _distance_to(b, spacing_rc)[a].sum() + _distance_to(a, spacing_rc)[b].sum()
    return float(total / (np.count_nonzero(a) + np.count_nonzero(b)))


def slice_dice(
    automatic: Any,
    reference: Any,
    frame_or_geometry: Union[AxialFrame, Geometry],
    labels: Optional[Sequence[int]] = None,
) -> Dict[str, np.ndarray]:
    """Per axial slice, the automatic contour against the reference.

    Args:
        automatic, reference: (k, j, i) arrays on the image grid (bool, or label maps: voxels with a value
            in `labels`, else any non-zero value), or, with a Geometry, label files / ``.seg.nrrd`` files /
            SimpleITK images, placed on its grid.
        frame_or_geometry: the image's Geometry, or its `AxialFrame`; slices are taken along the axis
            closest to superior-inferior, index k as in the scorer's slice table.
        labels: label values that make up the structure (default: any non-zero value), for both contours.

    Returns:
        dict of per-slice arrays (length = number of axial slices): ``dice`` (2|A&R| / (|A| + |R|); 1.0
        where both are empty), ``automatic_voxels``, ``reference_voxels``, ``intersection_voxels`` and
        ``surface_distance_mm`` (mean symmetric surface distance in mm with the in-plane spacing; NaN
        where either contour is empty on the slice).
    """
    if isinstance(frame_or_geometry, Geometry):
        geometry, frame = frame_or_geometry, AxialFrame.from_geometry(frame_or_geometry)
    elif isinstance(frame_or_geometry, AxialFrame):
        geometry, frame = None, frame_or_geometry
    else:
        raise InputError(
            f"frame_or_geometry must be a Geometry or an AxialFrame, got {type(frame_or_geometry).__name__}."
        )
    automatic = _on_grid(automatic, geometry, labels, "automatic segmentation")
    reference = _on_grid(reference, geometry, labels, "reference contour")
    if automatic.shape != reference.shape:
        raise InputError(f"automatic segmentation {automatic.shape} and reference {reference.shape} differ in shape.")
    a, r = frame.view(automatic), frame.view(reference)
    a_count = np.count_nonzero(a, axis=(1, 2)).astype(np.int64)
    r_count = np.count_nonzero(r, axis=(1, 2)).astype(np.int64)
    both = np.count_nonzero(a & r, axis=(1, 2)).astype(np.int64)
    total = a_count + r_count
    dice = np.where(total > 0, 2.0 * both / np.maximum(total, 1), 1.0)
    distance = np.full(len(dice), np.nan)
    present = np.flatnonzero((a_count > 0) & (r_count > 0))
    if present.size:
        spacing = (frame.row_spacing, frame.column_spacing)
        edge_a, edge_r = _edges(np.ascontiguousarray(a[present])), _edges(np.ascontiguousarray(r[present]))
        for n, k in enumerate(present):
            distance[k] = _mean_surface_distance(edge_a[n], edge_r[n], spacing)
    return {
        "dice": dice,
        "automatic_voxels": a_count,
        "reference_voxels": r_count,
        "intersection_voxels": both,
        "surface_distance_mm": distance,
    }


# ----------------------------------------------------------------------------------------------------------
# Which slices failed
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureRule:
    """When a slice's automatic contour counts as failed.

    - **Dice rule**: Dice < `dice_threshold` on a slice where the reference has at least
      `min_reference_voxels` voxels (and at least one). A missing automatic contour there has Dice 0 and
      fails by this rule whatever `count_missing` says.
    - **Missing/extra rule** (when `count_missing`): an automatic contour on a slice where the reference has
      none, or none on a slice where the reference has one (of any size).
    - Never failed: slices where both are empty; slices where the reference has fewer than
      `min_reference_voxels` voxels and both have a contour (Dice of a few voxels says little; such a slice
      is judged by the missing/extra rule only, which it passes).
    """

    dice_threshold: float = 0.8
    min_reference_voxels: int = 50
    count_missing: bool = True

    def __post_init__(self):
        value = self.dice_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise InputError(f"failure Dice threshold {value!r} must be a number in (0, 1].")
        count = self.min_reference_voxels
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise InputError(f"failure minimum reference voxels {count!r} must be a whole number >= 0.")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _table_column(table: Dict[str, Any], key: str) -> np.ndarray:
    if key not in table:
        raise InputError(f"the slice table has no '{key}' column (see slice_dice).")
    return np.asarray(table[key])


def failed_slices(dice_table: Dict[str, Any], rule: Optional[FailureRule] = None) -> np.ndarray:
    """Bool per slice: the slice failed by `rule` (default FailureRule()); `dice_table` as from `slice_dice`."""
    rule = rule or FailureRule()
    dice = _as_scores(_table_column(dice_table, "dice"), "dice")
    automatic = _table_column(dice_table, "automatic_voxels")
    reference = _table_column(dice_table, "reference_voxels")
    if not dice.shape == automatic.shape == reference.shape:
        raise InputError(f"slice table columns differ in length: {dice.shape}, {automatic.shape}, {reference.shape}.")
    judged = reference >= max(int(rule.min_reference_voxels), 1)
    failed = judged & (dice < float(rule.dice_threshold))
    if rule.count_missing:
        failed |= (automatic > 0) != (reference > 0)
    return failed


# ----------------------------------------------------------------------------------------------------------
# How well a slice score predicts the failures
# ----------------------------------------------------------------------------------------------------------


def _trapezoid(coverage: np.ndarray, risk: np.ndarray) -> float:
    return float(np.sum(np.abs(np.diff(coverage)) * (risk[1:] + risk[:-1]) / 2.0)) if coverage.size > 1 else 0.0


def _risk_after_removing(losses_in_order: np.ndarray) -> np.ndarray:
    """Mean loss of the slices left when the first r are removed, r = 0 .. n-1."""
    n = losses_in_order.size
    removed = np.r_[0.0, np.cumsum(losses_in_order)[:-1]]
    left = np.maximum(losses_in_order.sum() - removed, 0.0)
    return left / (n - np.arange(n))


def risk_coverage(scores: Any, loss: Any) -> Dict[str, np.ndarray]:
    """Risk-coverage curve of flagging the top-scored slices first.

    Point r (r = 0 .. n-1 slices flagged) has coverage (n - r) / n and risk = mean loss of the n - r
    slices left. Slices with tied scores are flagged in random order: their risk is the expected one
    (each gets the tie group's mean loss), so the curve does not depend on the order of the input.
    """
    scores = _as_scores(scores, "scores")
    loss = _as_scores(loss, "loss")
    _check_same_length(scores, "scores", loss, "loss")
    n = scores.size
    order = np.argsort(-scores, kind="mergesort")
    ranked, ranked_loss = scores[order], loss[order]
    group = np.r_[0, np.cumsum(ranked[1:] != ranked[:-1])] if n else np.zeros(0, dtype=int)
    expected = (np.bincount(group, weights=ranked_loss) / np.bincount(group))[group] if n else ranked_loss
    return {"coverage": (n - np.arange(n)) / max(n, 1), "risk": _risk_after_removing(expected)}


def flag_ranking(slices) -> np.ndarray:
    """The scorer's per-slice ranking as its flags see it: the normalised score (organ-aware inside the
    segmentation when the case had one), and -inf for slices outside the ROI, which can never be flagged."""
    normalised = np.asarray(slices["normalised"], dtype=np.float64)
    return np.where(np.asarray(slices["in_roi"], dtype=bool), normalised, -np.inf)


def failure_metrics(scores: Any, failed: Any, dice: Any, flagged: Any) -> Dict[str, Any]:
    """How well a per-slice score (and its flags) predicts failed slices; any score, arrays only.

    Args:
        scores: per slice, higher = more likely to fail (``inf`` ranks first; NaN is refused). The scorer's
            normalised score, a random score, a segmenter's uncertainty, ...
        failed: per slice, True where the automatic contour failed (`failed_slices`).
        dice: per slice, Dice of the automatic contour against the reference, in [0, 1] (1.0 where both
            are empty, as `slice_dice` gives).
        flagged: per slice, True where the slice is flagged for review (recontoured).

    Returns:
        dict with ``n_slices``, ``n_failures``, ``n_flagged``, ``failures_flagged``, ``failure_sensitivity``
        (failures flagged / failures; None without failures), ``flagged_per_failure_found`` (flagged /
        failures flagged; None when no failure is flagged), ``failure_auroc`` and ``failure_auprc`` (of the
        score, failures positive; None when only one class is present), ``risk_coverage`` ({``coverage``,
        ``risk``}: see `risk_coverage`, risk = 1 - Dice, from coverage 1 down to 1/n), ``aurc`` (its area,
        trapezoid over coverage), ``aurc_random`` (the same area for a random ranking: constant risk =
        mean(1 - Dice)), ``aurc_optimal`` (ranking by 1 - Dice itself), ``operating_point`` ({``coverage``:
        share of slices not flagged, ``risk``: mean 1 - Dice of those, None when all are flagged}),
        ``mean_dice_before`` (all slices), ``mean_dice_after`` (flagged slices recontoured: Dice 1.0) and
        ``dice_recovered_share`` ((after - before) / (1 - before); None when nothing was lost).
    """
    scores = _as_scores(scores, "scores")
    failed = _as_bool(failed, "failed")
    dice = _as_scores(dice, "dice")
    flagged = _as_bool(flagged, "flagged")
    for values, name in ((failed, "failed"), (dice, "dice"), (flagged, "flagged")):
        _check_same_length(scores, "scores", values, name)
    if scores.size == 0:
        raise InputError("scores is empty: there are no slices to evaluate.")
    if not np.all((dice >= 0.0) & (dice <= 1.0)):
        raise InputError("dice must lie in [0, 1] on every slice.")

    from monai.metrics import compute_average_precision, compute_roc_auc

    n = scores.size
    loss = 1.0 - dice
    curve = risk_coverage(scores, loss)
    optimal = _risk_after_removing(np.sort(loss)[::-1])
    mean_loss = float(loss.mean())
    n_failures = int(np.count_nonzero(failed))
    n_flagged = int(np.count_nonzero(flagged))
    found = int(np.count_nonzero(failed & flagged))
    before = float(dice.mean())
    after = float(np.where(flagged, 1.0, dice).mean())
    lost = 1.0 - before
    return {
        "n_slices": int(n),
        "n_failures": n_failures,
        "n_flagged": n_flagged,
        "failures_flagged": found,
        "failure_sensitivity": found / n_failures if n_failures else None,
        "flagged_per_failure_found": n_flagged / found if found else None,
        "failure_auroc": _monai_binary_metric(compute_roc_auc, scores, failed),
        "failure_auprc": _monai_binary_metric(compute_average_precision, scores, failed),
        "risk_coverage": {"coverage": curve["coverage"].tolist(), "risk": curve["risk"].tolist()},
        "aurc": _trapezoid(curve["coverage"], curve["risk"]),
        "aurc_random": mean_loss * (1.0 - 1.0 / n),
        "aurc_optimal": _trapezoid(curve["coverage"], optimal),
        "operating_point": {
            "coverage": (n - n_flagged) / n,
            "risk": float(loss[~flagged].mean()) if n_flagged < n else None,
        },
        "mean_dice_before": before,
        "mean_dice_after": after,
        "dice_recovered_share": (after - before) / lost if lost > 1e-12 else None,
    }


# ----------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------


def _check_failure_case(case: Any, i: int) -> Dict[str, Any]:
    if not isinstance(case, dict):
        raise InputError(f"per_case[{i}] must be a dict with 'name', 'dice', 'failed', 'flagged'.")
    for key in ("dice", "failed", "flagged"):
        if key not in case:
            raise InputError(f"per_case[{i}] has no '{key}'.")
    name = str(case.get("name", f"case {i + 1}"))
    dice = _as_scores(case["dice"], f"per_case[{i}] ('{name}') dice")
    failed = _as_bool(case["failed"], f"per_case[{i}] ('{name}') failed")
    flagged = _as_bool(case["flagged"], f"per_case[{i}] ('{name}') flagged")
    _check_same_length(dice, f"per_case[{i}] ('{name}') dice", failed, "failed")
    _check_same_length(dice, f"per_case[{i}] ('{name}') dice", flagged, "flagged")
    return {"name": name, "dice": dice, "failed": failed, "flagged": flagged}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_failure_png(
    path: Union[str, Path],
    per_case: Sequence[Dict[str, Any]],
    report: Dict[str, Any],
    max_cases: int = 6,
    title: Optional[str] = None,
    dpi: int = 110,
) -> Path:
    """Write a PNG: the risk-coverage curve (left) and Dice along the slices of the first cases (right).

    Args:
        path: output .png file.
        per_case: per case a dict with ``name``, ``dice``, ``failed`` and ``flagged`` (per slice, in slice
            order); flagged slices are marked, failed slices shaded.
        report: the pooled `failure_metrics` (``risk_coverage``, ``aurc``, ``aurc_random``,
            ``operating_point``, ``mean_dice_before``/``after``, counts).
        max_cases: at most this many cases (the first ones) are drawn.

    Matplotlib's Agg canvas of its own, no pyplot (as `metrics.write_report_png`). Returns the path written.
    """
    checked = [_check_failure_case(c, i) for i, c in enumerate(per_case or ())]
    shown = checked[: max(0, int(max_cases))]
    if not isinstance(report, dict) or "risk_coverage" not in report:
        raise InputError("report must be the dict failure_metrics returns (it has no 'risk_coverage').")
    coverage = _as_scores(report["risk_coverage"]["coverage"], "risk_coverage coverage")
    risk = _as_scores(report["risk_coverage"]["risk"], "risk_coverage risk")
    _check_same_length(coverage, "coverage", risk, "risk")
    path = Path(path)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, grid, ax, height = new_report_figure(len(shown), 2.1, 0.6, dpi)
    # --- left: risk-coverage ---
    mean_risk = float(risk[0]) if risk.size else 0.0
    ax.axhline(
        mean_risk,
        linestyle="--",
        color="0.6",
        linewidth=1,
        label=f"Random ranking (AURC {_fmt(report.get('aurc_random'))})",
    )
    ax.plot(coverage, risk, color="tab:blue", linewidth=2, label=f"Slice score (AURC {_fmt(report.get('aurc'))})")
    point = report.get("operating_point") or {}
    if point.get("risk") is not None:
        ax.plot(
            point["coverage"],
            point["risk"],
            marker="o",
            markersize=9,
            color="tab:red",
            linestyle="none",
            label=f"Calibrated threshold: {report.get('n_flagged', 0)} flagged, risk {point['risk']:.3f}",
        )
    ax.set_xlim(1.02, -0.02)
    top = max(float(risk.max()) if risk.size else 0.0, mean_risk, 0.05)
    ax.set_ylim(-0.02 * top, 1.1 * top)
    ax.set_xlabel("Coverage (share of slices left unflagged; top scores flagged first)")
    ax.set_ylabel("Risk: mean 1 - Dice of the unflagged slices")
    ax.set_title(
        f"Risk-coverage\n{report.get('n_slices', coverage.size)} slices, {report.get('n_failures', 0)} failed; "
        f"mean Dice {_fmt(report.get('mean_dice_before'))} -> {_fmt(report.get('mean_dice_after'))} "
        "after recontouring the flagged",
        fontsize=10.5,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9)

    # --- right: Dice along the slices, one row per case ---
    if not shown:
        empty_panel(fig, grid[0, 1], "No per-case slices to show")
    for row, case in enumerate(shown):
        axc = fig.add_subplot(grid[row, 1])
        dice, failed, flagged = case["dice"], case["failed"], case["flagged"]
        x = np.arange(dice.size, dtype=np.float64)
        for start, stop in _runs(failed):
            axc.axvspan(start - 0.5, stop + 0.5, color="tab:orange", alpha=0.25, linewidth=0)
        axc.plot(x, dice, color="tab:green", linewidth=1.3, marker=".", markersize=3)
        axc.plot(x[flagged], dice[flagged], marker="v", color="tab:red", linestyle="none", markersize=6)
        found = int(np.count_nonzero(failed & flagged))
        axc.set_title(
            f"{case['name']}: {int(np.count_nonzero(failed))} of {dice.size} slices failed, "
            f"{int(np.count_nonzero(flagged))} flagged, {found} failure(s) among them",
            fontsize=10,
            loc="left",
        )
        axc.set_ylim(-0.05, 1.08)
        axc.set_ylabel("Dice", fontsize=9)
        axc.grid(True, alpha=0.3)
        if dice.size:
            axc.set_xlim(-0.5, dice.size - 0.5)
        if row == len(shown) - 1:
            axc.set_xlabel("Slice index (axial, as in the slice table)")
    handles: List[Any] = [
        Line2D([], [], color="tab:green", label="Dice, automatic vs reference"),
        Line2D([], [], color="tab:red", marker="v", linestyle="none", label="Flagged slice"),
        Patch(color="tab:orange", alpha=0.25, label="Failed slice"),
    ]
    title = title or "AnomalyFlag: flags against failures of the automatic segmentation"
    return finish_report_figure(
        fig, path, title, height, handles if shown else [], dpi, "failure PNG", len(shown), len(checked)
    )


SLICES_CSV_COLUMNS = ("case", "index", "score", "flagged", "failed") + SLICE_COLUMNS


def failure_slices_csv(per_case: Sequence[Dict[str, Any]]) -> str:
    """CSV text, one row per slice of every case: `SLICES_CSV_COLUMNS` (per case a dict with ``name``,
    ``scores``, ``flagged``, ``failed`` and the `slice_dice` columns); an empty field is NaN, ``inf`` an
    infinite score."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SLICES_CSV_COLUMNS)
    for case in per_case:
        columns = [case["scores"], case["flagged"], case["failed"]] + [case[c] for c in SLICE_COLUMNS]
        for k, values in enumerate(zip(*columns)):
            row: List[Any] = [case["name"], k]
            for v in values:
                if isinstance(v, (bool, np.bool_)):
                    row.append(int(v))
                elif isinstance(v, (int, np.integer)):
                    row.append(int(v))
                else:
                    row.append("" if math.isnan(float(v)) else f"{float(v):.10g}")
            writer.writerow(row)
    return buf.getvalue()
