"""A PNG montage of a case's most anomalous flagged slices: CT, heatmap overlay and ROI contour.

For the command line and batch reports (no Slicer needed); drawn with matplotlib's Agg canvas. The
slices come from the scoring pass itself (MontageSlices keeps the few it may show), so nothing is read
again.
"""

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..atomic_files import atomic_path
from ..orientation import AxialFrame
from ..results import HEATMAP_DISPLAY_MAX, HEATMAP_SCALE, CaseResult, heatmap_colours


def heatmap_colormap():
    """The heatmap colour table of Slicer's display as a matplotlib colour map over 0..HEATMAP_DISPLAY_MAX."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(heatmap_colours(), name="anomalyflag")


class MontageSlices:
    """Keeps, while a volume is scored, the slices a montage may show: the `keep` highest by their own
    calibrated score, each as (image, heatmap, ROI mask) in the scoring orientation. Memory is bounded by
    `keep` slices whatever the volume's length."""

    def __init__(self, max_slices: int = 6):
        self.max_slices = max_slices
        self.keep = 3 * max_slices
        self.slices: Dict[int, Tuple[float, np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}

    def offer(self, k0: int, image: np.ndarray, heatmap: np.ndarray, roi: Optional[np.ndarray], scores) -> None:
        for n, score in enumerate(np.asarray(scores, dtype=float)):
            score = score if np.isfinite(score) else -np.inf
            if len(self.slices) >= self.keep:
                lowest = min(self.slices, key=lambda k: self.slices[k][0])
                if self.slices[lowest][0] >= score:
                    continue
                del self.slices[lowest]
            mask = None if roi is None else np.array(roi[n], dtype=bool)
            self.slices[k0 + n] = (score, np.array(image[n]), np.array(heatmap[n]), mask)


def display_window(preprocess, images: np.ndarray):
    """(low, high) grey levels to show slices with: the model's first window for CT (soft tissue by
    default), the shown slices' percentile range for MRI."""
    if preprocess.modality == "CT":
        return tuple(preprocess.windows[0])
    lo, hi = np.percentile(images, preprocess.mr_percentiles)
    return float(lo), float(hi)


def write_flagged_montage(path, kept: MontageSlices, result: CaseResult, preprocess) -> Optional[Path]:
    """Draw up to `kept.max_slices` flagged slices that were kept (highest normalised score first); None
    if there are none. Slices are shown in the radiological view (patient right on the left of the
    picture, anterior at the top)."""
    scores = result.slices["normalised"]
    chosen = sorted((k for k in result.flagged_indices if k in kept.slices), key=lambda k: -scores[k])
    chosen = chosen[: kept.max_slices]
    if not chosen:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frame = AxialFrame.from_geometry(result.geometry)
    window = display_window(preprocess, np.stack([kept.slices[k][1] for k in chosen]))
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    aspect = frame.row_spacing / frame.column_spacing
    fig = Figure(figsize=(4.2 * cols, 4.5 * rows), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    cmap = heatmap_colormap()
    for n, k in enumerate(chosen):
        _, image, heat, mask = kept.slices[k]
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
        ax.imshow(heat.astype(np.float32) * HEATMAP_SCALE, cmap=cmap, vmin=0.0, vmax=HEATMAP_DISPLAY_MAX,
                  aspect=aspect, interpolation="nearest")  # fmt: skip
        if mask is not None and mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="deepskyblue", linewidths=1.2)
        ax.set_title(
            f"slice {k}  z {result.slices['z_mm'][k]:.1f} mm\nscore {scores[k]:.2f} (threshold {result.threshold:.2f})",
            color="white",
            fontsize=9,
        )
        ax.set_axis_off()
    flagged = len(result.flagged_indices)
    fig.suptitle(f"{result.name}: {flagged} flagged slice(s) of {len(scores)}", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, facecolor="black")
    return path
