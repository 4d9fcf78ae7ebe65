"""What scoring a case produces, without torch: the per-slice score table (its fixed columns and their
descriptions), the heatmap scale and CaseResult. The MRML bridge and the readers import this alone.

A backend's component columns sit between LEADING_COLUMNS and TRAILING_COLUMNS, described by the
backend's `components`; every other column means the same for every backend.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .distribution import MESSAGE as DISTRIBUTION_MESSAGE
from .geometry import Geometry

LEADING_COLUMNS = ("index", "z_mm", "position")
TRAILING_COLUMNS = ("score", "score_from", "normalised", "flagged", "in_roi", "anomaly_fraction", "score_kind")
COLUMN_DESCRIPTIONS = {
    "index": "slice index along the volume's axis closest to superior-inferior",
    "z_mm": "superior coordinate of the slice centre (mm)",
    "position": "relative position in the scan (0 inferior, 1 superior)",
    "score": "mean of the most anomalous part of the normalised anomaly map (see ScoreConfig.score_area_mm2)",
    "score_from": "the slice whose score this slice takes: itself or a neighbour with a higher score",
    "normalised": "(score of score_from - median) / MAD of normal slices here, less the scan's level (its median "
    "where positive, see scan_level); flagged above the threshold",
    "flagged": "1 when the slice is flagged",
    "in_roi": "1 when the slice is within the region of interest",
    "anomaly_fraction": "share of ROI/body pixels over the pixel threshold",
    "score_kind": "which score and calibration the slice's normalised score is: 'organ' (inside the segmentation "
    "plus its margin, calibrated on normal scans with their contours) or 'body' (the whole-body score)",
}


def slice_columns(component_names: Sequence[str]) -> tuple:
    """Column order of a slice table for a backend with these component names."""
    return LEADING_COLUMNS + tuple(component_names) + TRAILING_COLUMNS


@dataclass
class SliceTable:
    """One row per slice, in slice order; `columns` in table order (see slice_columns), and a one-line
    description of each."""

    columns: Dict[str, np.ndarray]
    descriptions: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["index"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def names(self) -> List[str]:
        return list(self.columns)

    def rows(self) -> List[dict]:
        return [{c: v[i].item() for c, v in self.columns.items()} for i in range(len(self))]


HEATMAP_SCALE = 0.02
"""Anomaly index per heatmap step: stored value * HEATMAP_SCALE = anomaly map / calibrated pixel
threshold, so 1.0 (stored 50) is the pixel threshold and 255 stands for 5.1 or more."""
HEATMAP_UNITS = "anomaly map / calibrated pixel threshold (1.0 = pixel threshold)"
HEATMAP_DISPLAY_MAX = 4.0
"""Anomaly index shown at full red; the colour table spans the index 0 .. HEATMAP_DISPLAY_MAX."""
HEATMAP_COLOUR_STOPS = (
    (0.00, 0.00, 0.00, 0.00, 0.0),
    (0.15, 0.55, 0.45, 0.00, 0.6),
    (0.25, 1.00, 0.95, 0.10, 1.0),
    (0.55, 1.00, 0.55, 0.00, 1.0),
    (1.00, 0.90, 0.00, 0.00, 1.0),
)
"""(position 0..1 in the table, r, g, b, alpha): transparent at 0, yellow at the pixel threshold (index 1.0),
orange, then red at HEATMAP_DISPLAY_MAX. Slicer's colour node and the montage both use it."""


def heatmap_colours(count: int = 256) -> np.ndarray:
    """RGBA (count, 4) floats of the heatmap colour table (see HEATMAP_COLOUR_STOPS)."""
    stops = np.asarray(HEATMAP_COLOUR_STOPS)
    t = np.linspace(0.0, 1.0, count)
    return np.stack([np.interp(t, stops[:, 0], stops[:, c]) for c in range(1, 5)], axis=1)


@dataclass
class CaseResult:
    """Everything scoring one volume produced."""

    name: str
    geometry: Geometry
    slices: SliceTable
    threshold: float
    model_name: str
    model_fingerprint: str
    heatmap: Optional[np.ndarray] = None  # uint8 (k, j, i) when kept in memory
    heatmap_scale: float = HEATMAP_SCALE
    roi: Optional[dict] = None
    timings: Dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    warnings: List[str] = field(default_factory=list)  # why the scan looks unlike the training data
    scan_level: float = 0.0  # subtracted from every normalised score (calibration.scan_level)

    @property
    def out_of_distribution(self) -> bool:
        return bool(self.warnings)

    def warning_text(self) -> str:
        """One sentence for the user, empty when the scan looks like the training data."""
        return f"{DISTRIBUTION_MESSAGE}: {'; '.join(self.warnings)}." if self.warnings else ""

    def level_text(self) -> str:
        """One sentence when the flags are relative to a scan that scores high throughout, else empty."""
        if self.scan_level <= 0:
            return ""
        return f"flags are relative to this scan, which scores {self.scan_level:.2f} above normal scans throughout"

    def with_threshold(self, threshold: float) -> "CaseResult":
        """The same result flagged at another normalised-score threshold (a user override)."""
        columns = dict(self.slices.columns)
        columns["flagged"] = (columns["normalised"] > threshold) & columns["in_roi"]
        table = SliceTable(columns, self.slices.descriptions)
        return dataclasses.replace(self, slices=table, threshold=float(threshold))

    @property
    def flagged_indices(self) -> List[int]:
        return [int(i) for i in self.slices["index"][self.slices["flagged"]]]

    def heatmap_image(self) -> sitk.Image:
        """The heatmap as a SimpleITK image in the input's exact geometry (uint8, see HEATMAP_SCALE)."""
        if self.heatmap is None:
            raise ValueError("this result's heatmap was streamed to a file, not kept in memory")
        image = sitk.GetImageFromArray(self.heatmap)
        return self.geometry.apply_to(image)

    def summary(self) -> dict:
        normalised = self.slices["normalised"]
        flagged = self.flagged_indices
        return {
            "case": self.name,
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "threshold": self.threshold,
            "num_slices": len(self.slices),
            "num_flagged": len(flagged),
            "flagged_slices": flagged,
            "max_normalised_score": float(np.max(normalised)),
            "scan_level": self.scan_level,
            "geometry": self.geometry.to_dict(),
            "heatmap_scale": self.heatmap_scale,
            "heatmap_units": HEATMAP_UNITS,
            "columns": self.slices.descriptions,
            "slice_axis": "voxel axis closest to superior-inferior; index is the voxel index along it",
            "roi": self.roi,
            "out_of_distribution": self.out_of_distribution,
            "warnings": [self.warning_text()] if self.warnings else [],
            "device": self.device,
            "timings_s": self.timings,
        }
