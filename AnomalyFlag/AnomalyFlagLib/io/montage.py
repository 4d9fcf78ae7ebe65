"""A PNG montage of a case's most anomalous flagged slices: CT, heatmap overlay and ROI contour.

For the command line and batch reports (no Slicer needed); drawn with matplotlib's Agg canvas.
"""

from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic_files import atomic_path
from ..orientation import AxialFrame
from ..results import HEATMAP_SCALE, CaseResult


def heatmap_colormap():
    """Transparent below the pixel threshold, then yellow to red (shared look with the Slicer display)."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(
        "anomalyflag", [(0.0, (1, 1, 0, 0.0)), (0.05, (1, 1, 0, 0.55)), (0.5, (1, 0.5, 0, 0.7)), (1.0, (1, 0, 0, 0.85))]
    )


def display_window(preprocess, image: np.ndarray):
    """(low, high) grey levels to show a slice with: the model's first window for CT (soft tissue by
    default), the volume's percentile range for MRI."""
    if preprocess.modality == "CT":
        return tuple(preprocess.windows[0])
    lo, hi = np.percentile(image[:: max(1, image.shape[0] // 16)], preprocess.mr_percentiles)
    return float(lo), float(hi)


def write_flagged_montage(
    path,
    image: np.ndarray,
    heatmap: np.ndarray,
    result: CaseResult,
    roi: Optional[np.ndarray] = None,
    window=(-1000.0, 1000.0),
    max_slices: int = 6,
) -> Optional[Path]:
    """Draw up to `max_slices` flagged slices (highest normalised score first); None if none flagged.

    `image`, `heatmap` and `roi` are (k, j, i) arrays on the input grid; slices are shown in the
    radiological view (patient right on the left of the picture, anterior at the top).
    """
    flagged = result.flagged_indices
    if not flagged:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frame = AxialFrame.from_geometry(result.geometry)
    img, heat = frame.view(image), frame.view(heatmap)
    mask = frame.view(roi) if roi is not None else None
    scores = result.slices["normalised"]
    chosen = sorted(flagged, key=lambda k: -scores[k])[:max_slices]
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    aspect = frame.row_spacing / frame.column_spacing
    fig = Figure(figsize=(4.2 * cols, 4.5 * rows), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    cmap = heatmap_colormap()
    for n, k in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(img[k], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
        index = heat[k].astype(np.float32) * HEATMAP_SCALE
        overlay = np.ma.masked_less_equal(index, 1.0)
        ax.imshow(overlay, cmap=cmap, vmin=1.0, vmax=4.0, aspect=aspect, interpolation="nearest")
        if mask is not None and mask[k].any():
            ax.contour(mask[k].astype(float), levels=[0.5], colors="deepskyblue", linewidths=1.2)
        ax.set_title(
            f"slice {k}  z {result.slices['z_mm'][k]:.1f} mm\nscore {scores[k]:.2f} (threshold {result.threshold:.2f})",
            color="white",
            fontsize=9,
        )
        ax.set_axis_off()
    fig.suptitle(f"{result.name}: {len(flagged)} flagged slice(s) of {len(scores)}", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, facecolor="black")
    return path
