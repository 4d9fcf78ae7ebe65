"""The per-slice score table: its fixed columns, their descriptions, and the table itself.

A backend's component columns sit between LEADING_COLUMNS and TRAILING_COLUMNS, described by the
backend's `components`; every other column means the same for every backend.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

LEADING_COLUMNS = ("index", "z_mm", "position")
TRAILING_COLUMNS = ("score", "score_from", "normalised", "flagged", "in_roi", "anomaly_fraction")
COLUMN_DESCRIPTIONS = {
    "index": "slice index along the volume's axis closest to superior-inferior",
    "z_mm": "superior coordinate of the slice centre (mm)",
    "position": "relative position in the scan (0 inferior, 1 superior)",
    "score": "mean of the most anomalous part of the normalised anomaly map (see ScoreConfig.score_area_mm2)",
    "score_from": "the slice whose score this slice takes: itself or a neighbour with a higher score",
    "normalised": "(score of score_from - median) / MAD of normal slices here; flagged above the threshold",
    "flagged": "1 when the slice is flagged",
    "in_roi": "1 when the slice is within the region of interest",
    "anomaly_fraction": "share of ROI/body pixels over the pixel threshold",
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
