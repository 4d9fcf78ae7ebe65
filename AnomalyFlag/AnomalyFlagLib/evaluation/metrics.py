"""Evaluation against ground truth: slice metrics, pixel metrics, PNG and JSON reports.

Pure functions on numpy arrays (MONAI's metrics for slice-level AUROC/AUPRC, matplotlib's Agg backend
for the PNG, imported lazily); no model code. The engine calls them after scoring labelled cases.

Conventions
-----------
- A slice (or voxel) is *flagged* when its score is strictly greater than the threshold.
- Metrics that are undefined for the data at hand are ``None`` (JSON ``null``), never a made-up number:
  AUROC/AUPRC when only one class is present, sensitivity without anomalous slices, specificity without
  normal slices, precision when nothing is flagged.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic_files import atomic_path, dumps_json, write_text_atomic
from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "PixelAccumulator",
    "roc_curve",
    "slice_metrics",
    "write_report_json",
    "write_report_png",
]


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _as_scores(values: Any, name: str, ndim: Optional[int] = 1) -> np.ndarray:
    """Return a float64 array; reject non-numeric input, wrong dimensionality and NaN."""
    try:
        array = np.asarray(values)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name} cannot be read as a numeric array: {exc}") from exc
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number)):
        raise InputError(f"{name} must hold numbers, got dtype {array.dtype}.")
    if np.iscomplexobj(array):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}.")
    if ndim is not None and array.ndim != ndim:
        raise InputError(f"{name} must be a {ndim}-D array, got shape {array.shape}.")
    array = array.astype(np.float64, copy=False)
    n_nan = int(np.count_nonzero(np.isnan(array)))
    if n_nan:
        raise InputError(f"{name} contains {n_nan} NaN value(s) of {array.size}.")
    return array


def _as_bool(values: Any, name: str, ndim: Optional[int] = 1) -> np.ndarray:
    """Return a bool array; accept bool or 0/1 numbers, reject anything else."""
    try:
        array = np.asarray(values)
    except Exception as exc:
        raise InputError(f"{name} cannot be read as a boolean array: {exc}") from exc
    if ndim is not None and array.ndim != ndim:
        raise InputError(f"{name} must be a {ndim}-D array, got shape {array.shape}.")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} must be boolean (or 0/1), got dtype {array.dtype}.")
    if array.size and not np.all((array == 0) | (array == 1)):
        bad = np.unique(array[(array != 0) & (array != 1)])[:5]
        raise InputError(f"{name} must hold only 0/1 (or True/False), found {bad.tolist()}.")
    return array.astype(bool)


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {threshold!r}.") from exc
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}.")
    return value


def _check_same_length(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{a_name} and {b_name} differ in length/shape: {a.shape} vs {b.shape}.")


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den > 0 else None


# ----------------------------------------------------------------------------------------------------------
# Slice level
# ----------------------------------------------------------------------------------------------------------


def _monai_binary_metric(func: Any, scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Call a MONAI binary metric (1-D tensors, y in {0, 1}); None when a class is missing."""
    if labels.all() or not labels.any():
        return None
    import torch

    y_pred = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(func(y_pred, y))
    return value if math.isfinite(value) else None


def slice_metrics(scores: Any, labels: Any, threshold: float) -> Dict[str, Any]:
    """Slice-level detection metrics.

    Args:
        scores: normalised anomaly score per slice, 1-D (may be several cases concatenated). ``inf`` is
            allowed (it ranks above everything), NaN is not.
        labels: per slice, True when the slice contains ground-truth anomaly (bool or 0/1), same length.
        threshold: a slice is flagged when ``score > threshold``.

    Returns:
        dict with ``auroc``, ``auprc`` (average precision, the anomalous class positive; ``None`` when only
        one class is present), ``threshold``, ``sensitivity`` (TP / anomalous; ``None`` without anomalous
        slices), ``specificity`` (TN / normal; ``None`` without normal slices), ``false_flag_rate``
        (FP / normal; ``None`` without normal slices), ``precision`` (TP / flagged; ``None`` when nothing
        is flagged), ``n_slices``, ``n_anomalous``, ``n_normal``, ``n_flagged``, ``true_positives``,
        ``false_positives``, ``true_negatives``, ``false_negatives``.
    """
    scores = _as_scores(scores, "scores")
    labels = _as_bool(labels, "labels")
    _check_same_length(scores, "scores", labels, "labels")
    threshold = _check_threshold(threshold)
    if scores.size == 0:
        raise InputError("scores is empty: there are no slices to evaluate.")

    from monai.metrics import compute_average_precision, compute_roc_auc

    flagged = scores > threshold
    tp = int(np.count_nonzero(flagged & labels))
    fp = int(np.count_nonzero(flagged & ~labels))
    fn = int(np.count_nonzero(~flagged & labels))
    tn = int(np.count_nonzero(~flagged & ~labels))
    n_pos = tp + fn
    n_neg = fp + tn
    return {
        "auroc": _monai_binary_metric(compute_roc_auc, scores, labels),
        "auprc": _monai_binary_metric(compute_average_precision, scores, labels),
        "threshold": threshold,
        "sensitivity": _ratio(tp, n_pos),
        "specificity": _ratio(tn, n_neg),
        "false_flag_rate": _ratio(fp, n_neg),
        "precision": _ratio(tp, tp + fp),
        "n_slices": int(scores.size),
        "n_anomalous": n_pos,
        "n_normal": n_neg,
        "n_flagged": tp + fp,
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
    }


def roc_curve(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``score > t`` for every distinct score ``t`` (numpy; for plotting).

    Returns ``(fpr, tpr, thresholds)``, thresholds decreasing; the first point is ``(0, 0)`` with threshold
    ``+inf``, the last is ``(1, 1)``. Point ``i`` is the operating point of ``score >= thresholds[i]``.
    Tied scores form one step, so the trapezoidal area under this curve equals the (tie-aware) AUROC.
    Raises InputError when only one class is present (the curve is undefined).
    """
    scores = _as_scores(scores, "scores")
    labels = _as_bool(labels, "labels")
    _check_same_length(scores, "scores", labels, "labels")
    n_pos = int(np.count_nonzero(labels))
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"ROC curve is undefined: labels hold {n_pos} anomalous and {n_neg} normal slice(s); "
            "both classes are needed."
        )
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = labels[order]
    # last index of each run of equal scores
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s[ends]]
    return fpr, tpr, thresholds


# ----------------------------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------------------------


class PixelAccumulator:
    """Pixel-level AUROC, AUPRC and Dice accumulated case by case in constant memory.

    Each ``add`` histograms the heatmap values of anomalous and of normal voxels (inside the ROI) into
    ``n_bins`` equal bins over ``[0, max_value]``; values below 0 go to the first bin, values above
    ``max_value`` to the last. AUROC and AUPRC are then computed from the two histograms, treating the
    values of one bin as tied (same tie handling as MONAI's ``compute_roc_auc`` /
    ``compute_average_precision``).

    Exactness: heatmaps stored as ``uint8 * scale`` take only the values ``k * scale``. When
    ``max_value >= 255 * scale`` and the bin width ``max_value / n_bins`` is at most ``scale``, each
    distinct value falls into a bin of its own and the results equal those of the direct computation on
    all voxels. The accumulator checks this (it remembers one value per bin and compares every voxel
    with it) and reports ``histogram_exact``; when False (continuous-valued heatmaps, values clipped at
    the ends) AUROC/AUPRC are approximate, with the resolution of one bin.

    Dice: counts at the thresholds given in ``dice_thresholds`` are taken exactly in ``add``; for any
    other threshold ``result`` uses the histogram (exact when ``histogram_exact``).
    """

    def __init__(
        self,
        max_value: float = 16.0,
        n_bins: int = 4096,
        dice_thresholds: Iterable[float] = (1.0,),
    ) -> None:
        max_value = _check_threshold(max_value, "max_value")
        if max_value <= 0:
            raise InputError(f"max_value must be positive, got {max_value}.")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
            raise InputError(f"n_bins must be an integer >= 2, got {n_bins!r}.")
        self.max_value = max_value
        self.n_bins = int(n_bins)
        self._pos = np.zeros(self.n_bins, dtype=np.int64)
        self._neg = np.zeros(self.n_bins, dtype=np.int64)
        self._value = np.full(self.n_bins, np.nan)  # one value seen in each bin
        self._exact = True
        self._dice_thresholds = tuple(_check_threshold(t, "dice_thresholds entry") for t in dice_thresholds)
        # threshold -> [tp, fp, fn]
        self._counts: Dict[float, List[int]] = {t: [0, 0, 0] for t in self._dice_thresholds}
        self.n_cases = 0

    def add(self, heatmap: Any, mask: Any, roi: Any = None) -> None:
        """Add one case.

        Args:
            heatmap: anomaly index per voxel (float; 1.0 = calibrated pixel threshold), any shape.
            mask: ground-truth anomaly mask (bool or 0/1), same shape.
            roi: optional mask (bool or 0/1), same shape: only voxels inside it count (e.g. the body).
        """
        heatmap = _as_scores(heatmap, "heatmap", ndim=None)
        mask = _as_bool(mask, "mask", ndim=None)
        _check_same_length(heatmap, "heatmap", mask, "mask")
        if roi is not None:
            roi = _as_bool(roi, "roi", ndim=None)
            _check_same_length(heatmap, "heatmap", roi, "roi")
            heatmap = heatmap[roi]
            mask = mask[roi]
        else:
            heatmap = heatmap.ravel()
            mask = mask.ravel()

        for t in self._dice_thresholds:
            above = heatmap > t
            n_above_pos = int(np.count_nonzero(above & mask))
            counts = self._counts[t]
            counts[0] += n_above_pos
            counts[1] += int(np.count_nonzero(above)) - n_above_pos
            counts[2] += int(np.count_nonzero(mask)) - n_above_pos

        index = np.floor(heatmap * (self.n_bins / self.max_value))
        np.clip(index, 0, self.n_bins - 1, out=index)
        index = index.astype(np.intp)
        self._pos += np.bincount(index[mask], minlength=self.n_bins)
        self._neg += np.bincount(index[~mask], minlength=self.n_bins)

        if self._exact and heatmap.size:
            seen = np.full(self.n_bins, np.nan)
            seen[index] = heatmap  # one (arbitrary) value per occupied bin
            if not np.array_equal(seen[index], heatmap):
                self._exact = False
            else:
                both = ~np.isnan(seen) & ~np.isnan(self._value)
                if not np.array_equal(seen[both], self._value[both]):
                    self._exact = False
                fill = np.isnan(self._value)
                self._value[fill] = seen[fill]
        self.n_cases += 1

    def _flagged_bins(self, threshold: float) -> np.ndarray:
        """Bins counted as above the threshold: by their value when exact, else by their centre."""
        if self._exact:
            values = np.where(np.isnan(self._value), -np.inf, self._value)
        else:
            values = (np.arange(self.n_bins) + 0.5) * (self.max_value / self.n_bins)
        return values > threshold

    def result(self, threshold: float = 1.0) -> Dict[str, Any]:
        """Metrics over all cases added so far.

        Returns:
            dict with ``pixel_auroc``, ``pixel_auprc`` (``None`` when only one class of voxel was seen),
            ``dice`` (2TP / (2TP + FP + FN) of ``heatmap > threshold`` vs mask, counts summed over all
            cases; ``None`` when there is neither anomaly nor a flagged voxel), ``threshold``,
            ``n_voxels``, ``n_anomalous_voxels``, ``n_flagged_voxels``, ``true_positive_voxels``,
            ``false_positive_voxels``, ``false_negative_voxels``, ``n_cases``, ``histogram_exact``
            (AUROC/AUPRC equal the direct computation) and ``dice_exact``.
        """
        threshold = _check_threshold(threshold)
        pos, neg = self._pos, self._neg
        n_pos = int(pos.sum())
        n_neg = int(neg.sum())

        auroc = auprc = None
        if n_pos and n_neg:
            p = pos.astype(np.float64)
            q = neg.astype(np.float64)
            # ascending bins: each positive beats the negatives in lower bins, ties count half
            neg_below = np.cumsum(q) - q
            auroc = float(np.sum(p * (neg_below + q / 2.0)) / (float(n_pos) * float(n_neg)))
            # descending bins: precision at each distinct value, weighted by the recall step
            p_desc, q_desc = p[::-1], q[::-1]
            tp_cum = np.cumsum(p_desc)
            all_cum = tp_cum + np.cumsum(q_desc)
            occupied = p_desc > 0
            auprc = float(np.sum(p_desc[occupied] * tp_cum[occupied] / all_cum[occupied]) / n_pos)

        if threshold in self._counts:
            tp, fp, fn = self._counts[threshold]
            dice_exact = True
        else:
            above = self._flagged_bins(threshold)
            tp = int(pos[above].sum())
            fp = int(neg[above].sum())
            fn = n_pos - tp
            dice_exact = self._exact
        denom = 2 * tp + fp + fn
        return {
            "pixel_auroc": auroc,
            "pixel_auprc": auprc,
            "dice": (2.0 * tp / denom) if denom else None,
            "threshold": threshold,
            "n_voxels": n_pos + n_neg,
            "n_anomalous_voxels": n_pos,
            "n_flagged_voxels": tp + fp,
            "true_positive_voxels": tp,
            "false_positive_voxels": fp,
            "false_negative_voxels": fn,
            "n_cases": self.n_cases,
            "histogram_exact": bool(self._exact),
            "dice_exact": bool(dice_exact),
        }


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _runs(flags: np.ndarray) -> List[Tuple[int, int]]:
    """(start, stop_inclusive) of each run of True."""
    padded = np.r_[False, flags, False].astype(np.int8)
    edges = np.diff(padded)
    starts = np.nonzero(edges == 1)[0]
    stops = np.nonzero(edges == -1)[0] - 1
    return list(zip(starts.tolist(), stops.tolist()))


def _check_case(case: Any, i: int) -> Dict[str, Any]:
    if not isinstance(case, dict):
        raise InputError(f"cases[{i}] must be a dict with 'name', 'scores', 'labels', got {type(case).__name__}.")
    for key in ("scores", "labels"):
        if key not in case:
            raise InputError(f"cases[{i}] has no '{key}'.")
    name = str(case.get("name", f"case {i + 1}"))
    scores = _as_scores(case["scores"], f"cases[{i}] ('{name}') scores")
    labels = _as_bool(case["labels"], f"cases[{i}] ('{name}') labels")
    _check_same_length(scores, f"cases[{i}] ('{name}') scores", labels, "labels")
    positions = case.get("positions")
    if positions is not None:
        positions = _as_scores(positions, f"cases[{i}] ('{name}') positions")
        _check_same_length(scores, f"cases[{i}] ('{name}') scores", positions, "positions")
        if not np.all(np.isfinite(positions)):
            raise InputError(f"cases[{i}] ('{name}') positions must be finite.")
    return {"name": name, "scores": scores, "labels": labels, "positions": positions}


def write_report_png(
    path: PathLike,
    slice_scores: Any,
    slice_labels: Any,
    threshold: float,
    cases: Sequence[Dict[str, Any]] = (),
    max_cases: int = 4,
    title: Optional[str] = None,
    dpi: int = 110,
) -> Path:
    """Write a PNG report: slice ROC curve (left) and score profiles of the first cases (right).

    Args:
        path: output .png file.
        slice_scores, slice_labels: all evaluated slices (cases concatenated), as for ``slice_metrics``.
        threshold: the calibrated slice threshold (normalised score units).
        cases: per case a dict with ``name``, ``scores`` (normalised score per slice, in slice order),
            ``labels`` (True on slices with ground-truth anomaly) and optionally ``positions`` (relative
            slice position in [0, 1], used as x axis; slice index otherwise).
        max_cases: at most this many cases (the first ones) are drawn.
        title: figure title; a default naming the slice counts is used when None.

    Returns the path written. Matplotlib is imported here and the figure is drawn on an Agg canvas of
    its own: no pyplot, no change to the global backend (safe inside Slicer's Python console).
    """
    slice_scores = _as_scores(slice_scores, "slice_scores")
    slice_labels = _as_bool(slice_labels, "slice_labels")
    _check_same_length(slice_scores, "slice_scores", slice_labels, "slice_labels")
    threshold = _check_threshold(threshold)
    if cases is None:
        cases = ()
    checked = [_check_case(c, i) for i, c in enumerate(cases)]
    shown = checked[: max(0, int(max_cases))]
    path = Path(path)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, grid, ax, height = new_report_figure(len(shown), 2.3, 0.55, dpi)
    # --- left: ROC ---
    metrics = slice_metrics(slice_scores, slice_labels, threshold) if slice_scores.size else None
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="Chance (AUROC 0.50)")
    if metrics is not None and metrics["auroc"] is not None:
        fpr, tpr, _ = roc_curve(slice_scores, slice_labels)
        ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"Slice score (AUROC {metrics['auroc']:.3f})")
        ax.plot(
            metrics["false_flag_rate"],
            metrics["sensitivity"],
            marker="o",
            markersize=9,
            color="tab:red",
            linestyle="none",
            label=(
                f"Threshold {threshold:.2f}: sensitivity {metrics['sensitivity']:.2f}, "
                f"specificity {metrics['specificity']:.2f}"
            ),
        )
    else:
        if metrics is None:
            reason = "no slices"
        elif metrics["n_anomalous"] == 0:
            reason = "no slice has ground-truth anomaly"
        else:
            reason = "no normal slice in the data"
        ax.text(0.5, 0.55, f"ROC curve undefined:\n{reason}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("False-flag rate (normal slices flagged)")
    ax.set_ylabel("Sensitivity (anomalous slices flagged)")
    roc_title = "Slice-level detection (ROC)"
    if metrics is not None:
        roc_title += (
            f"\n{metrics['n_slices']} slices, {metrics['n_anomalous']} with anomaly; "
            f"{metrics['n_flagged']} flagged, {metrics['true_positives']} of them correctly"
        )
    ax.set_title(roc_title, fontsize=10.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)

    # --- right: score along the slices, one row per case ---
    if not shown:
        empty_panel(fig, grid[0, 1], "No per-case scores to show")
    for row, case in enumerate(shown):
        axc = fig.add_subplot(grid[row, 1])
        scores, labels = case["scores"], case["labels"]
        n = scores.size
        if case["positions"] is not None:
            x = case["positions"]
            xlabel = "Relative slice position (0 = first slice, 1 = last)"
        else:
            x = np.arange(n, dtype=np.float64)
            xlabel = "Slice index"
        order = np.argsort(x, kind="mergesort")
        x, scores, labels = x[order], scores[order], labels[order]
        half = 0.5 * float(np.median(np.diff(x))) if n > 1 else 0.5
        for start, stop in _runs(labels):
            axc.axvspan(x[start] - half, x[stop] + half, color="tab:orange", alpha=0.25, linewidth=0)
        finite = np.isfinite(scores)
        axc.plot(x[finite], scores[finite], color="tab:blue", linewidth=1.3)
        axc.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.2)
        flagged = scores > threshold
        shown_scores = np.clip(scores, None, np.nanmax(np.where(finite, scores, -np.inf), initial=threshold))
        axc.plot(x[flagged], shown_scores[flagged], marker="v", color="tab:red", linestyle="none", markersize=5)
        n_flag = int(np.count_nonzero(flagged))
        n_anom = int(np.count_nonzero(labels))
        n_hit = int(np.count_nonzero(flagged & labels))
        truth = f"{n_anom} with anomaly, {n_hit} of them flagged" if n_anom else "no anomaly in ground truth"
        axc.set_title(
            f"{case['name']}: {n_flag} of {n} slices flagged; {truth}",
            fontsize=10,
            loc="left",
        )
        axc.set_ylabel("Anomaly score\n(normalised)", fontsize=9)
        axc.grid(True, alpha=0.3)
        if n:
            axc.set_xlim(x[0] - half, x[-1] + half)
        if row == len(shown) - 1:
            axc.set_xlabel(xlabel)
    if title is None:
        title = "AnomalyFlag evaluation: slices flagged by the anomaly detector vs ground truth"
    handles = [
        Line2D([], [], color="tab:blue", label="Slice score"),
        Line2D([], [], color="tab:red", linestyle="--", label=f"Threshold ({threshold:.2f})"),
        Line2D([], [], color="tab:red", marker="v", linestyle="none", label="Flagged slice (score > threshold)"),
        Patch(color="tab:orange", alpha=0.25, label="True anomaly (ground truth)"),
    ]
    return finish_report_figure(
        fig, path, title, height, handles if shown else [], dpi, "report PNG", len(shown), len(checked)
    )


def empty_panel(fig, cell, text: str) -> None:
    """A blank panel saying why it is empty (a report picture with no per-case rows)."""
    ax = fig.add_subplot(cell)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")


def new_report_figure(rows: int, row_height: float, hspace: float, dpi: int):
    """A report figure on an Agg canvas of its own (no pyplot): a summary panel on the left, `rows` per-slice
    panels on the right. Returns (figure, grid, the left axes, height in inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows = max(1, rows)
    height = max(4.8, 1.0 + row_height * n_rows)
    fig = Figure(figsize=(14.0, height), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n_rows, 2, width_ratios=(1.0, 1.75), wspace=0.22, hspace=hspace)
    return fig, grid, fig.add_subplot(grid[:, 0]) if n_rows > 1 else fig.add_subplot(grid[0, 0]), height


def finish_report_figure(fig, path: PathLike, title: str, height: float, legend: list, dpi: int, what: str,
                         shown: int = 0, cases: int = 0) -> Path:  # fmt: skip
    """Title, margins, the legend of the per-slice panels (none when empty) and, when only `shown` of the
    `cases` have a panel, a line saying so; then write it atomically (an OSError becomes an InputError
    naming `what` and the path)."""
    if cases > shown:
        fig.text(0.99, 0.005, f"Showing {shown} of {cases} cases", ha="right", va="bottom", fontsize=8.5,
                 color="0.3")  # fmt: skip
    fig.suptitle(title, fontsize=13, y=1.0 - 0.12 / height, va="top")
    fig.subplots_adjust(left=0.06, right=0.98, top=1.0 - 1.25 / height, bottom=0.55 / height + 0.02)
    if legend:
        fig.legend(handles=legend, loc="upper right", bbox_to_anchor=(0.98, 1.0 - 0.5 / height), ncol=len(legend),
                   fontsize=8.5, frameon=False)  # fmt: skip
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    except OSError as exc:
        raise InputError(f"cannot write {what} '{path}': {exc}") from exc
    return path


def write_report_json(path: PathLike, report: Dict[str, Any]) -> Path:
    """Write ``report`` as indented JSON, atomically (``atomic_files.dumps_json``: NaN and +/-inf become
    ``null``, numpy scalars and arrays JSON numbers and lists). Returns the path written.
    """
    if not isinstance(report, dict):
        raise InputError(f"report must be a dict, got {type(report).__name__}.")
    path = Path(path)
    try:
        text = dumps_json(report, indent=2)
    except (TypeError, ValueError) as exc:
        raise InputError(f"report cannot be written as JSON: {exc}") from exc
    try:
        write_text_atomic(path, text + "\n")
    except OSError as exc:
        raise InputError(f"cannot write report JSON '{path}': {exc}") from exc
    return path
