"""Calibration on held-out NORMAL slices only: robust per-position statistics and thresholds.

normalised = (score - median_bin) / (1.4826 * MAD_bin), bins over the relative slice position;
the slice threshold is the normalised-score quantile that flags `target_false_flag_rate` of normal
slices (relative to each scan's level where asked, see `scan_level`), and the pixel threshold the
anomaly-map quantile that marks `pixel_false_positive_rate` of normal body pixels. Nothing here ever
looks at anomalous data or rescales by a test set's range.
"""

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np

from .config import MAX_POSITION_BINS, check_rate, config_from_dict, expect, join_key
from .errors import InputError

MIN_SLICES = 10
MIN_SLICES_PER_BIN = 20
MAD_TO_SIGMA = 1.4826
MIN_SLICES_FOR_SCAN_LEVEL = 16
MAX_MAGNITUDE = 1e9
"""Largest magnitude of a calibrated score statistic or threshold (any larger is not from a calibration)."""


@dataclass
class Calibration:
    bin_edges: List[float]
    medians: List[float]
    scales: List[float]
    threshold: float
    pixel_threshold: float
    target_false_flag_rate: float
    pixel_false_positive_rate: float
    num_slices: int
    num_cases: int
    observed_false_flag_rate: float

    def normalise(self, scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Normalised scores for slice scores at relative positions in [0, 1]."""
        edges = np.asarray(self.bin_edges)
        bins = np.clip(np.searchsorted(edges, positions, side="right") - 1, 0, len(self.medians) - 1)
        return (np.asarray(scores) - np.asarray(self.medians)[bins]) / np.asarray(self.scales)[bins]

    def validate(self) -> None:
        """Raise FieldError for values no calibration produces (types are checked by `check_config`)."""
        bins = len(self.medians)
        expect(1 <= bins <= MAX_POSITION_BINS, "medians", f"1 to {MAX_POSITION_BINS} position bins", self.medians)
        expect(len(self.scales) == bins, "scales", f"{bins} scales, one per median", self.scales)
        edges = self.bin_edges
        expect(len(edges) == bins + 1, "bin_edges", f"{bins + 1} edges for the {bins} medians", edges)
        expect(edges[0] == 0, join_key("bin_edges", 0), "0 (edges run from 0 to 1)", edges[0])
        expect(edges[-1] == 1, join_key("bin_edges", bins), "1 (edges run from 0 to 1)", edges[-1])
        for i in range(1, bins + 1):
            expect(edges[i] > edges[i - 1], join_key("bin_edges", i), f"an edge above {edges[i - 1]}", edges[i])
        within = f"a value from -{MAX_MAGNITUDE:g} to {MAX_MAGNITUDE:g}"
        positive = f"above 0, at most {MAX_MAGNITUDE:g}"
        for i, (median, scale) in enumerate(zip(self.medians, self.scales)):
            expect(abs(median) <= MAX_MAGNITUDE, join_key("medians", i), within, median)
            expect(0 < scale <= MAX_MAGNITUDE, join_key("scales", i), positive, scale)
        expect(abs(self.threshold) <= MAX_MAGNITUDE, "threshold", within, self.threshold)
        expect(0 < self.pixel_threshold <= MAX_MAGNITUDE, "pixel_threshold", positive, self.pixel_threshold)
        check_rate(self.target_false_flag_rate, "target_false_flag_rate")
        check_rate(self.pixel_false_positive_rate, "pixel_false_positive_rate")
        observed = self.observed_false_flag_rate
        expect(0 <= observed <= 1, "observed_false_flag_rate", "a share from 0 to 1", observed)
        expect(self.num_slices >= MIN_SLICES, "num_slices", f"at least {MIN_SLICES} slices", self.num_slices)
        expect(self.num_cases >= 1, "num_cases", "at least 1 case", self.num_cases)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, key: str = "calibration") -> "Calibration":
        """From metadata; raises FieldError (see `config.config_from_dict`)."""
        return config_from_dict(cls, data, key)


def describe_region(labels: Optional[Sequence[int]], margin_mm: float) -> str:
    """'labels 2, 3 plus 10 mm' or 'any non-zero label plus 10 mm'."""
    which = f"labels {', '.join(map(str, labels))}" if labels else "any non-zero label"
    return f"{which} plus {float(margin_mm):g} mm"


@dataclass
class OrganCalibration(Calibration):
    """Calibration of the organ-aware score: the localised score of the anomaly map inside a segmentation
    (`labels`, None: any non-zero) dilated by `margin_mm`, on normal scans with their contours. It applies
    to a scan scored with the same labels and margin."""

    labels: Optional[List[int]] = None
    margin_mm: float = 10.0

    def applies(self, labels: Optional[Sequence[int]], margin_mm: float) -> bool:
        mine = sorted(self.labels) if self.labels else None
        theirs = sorted(int(v) for v in labels) if labels else None
        return mine == theirs and abs(float(margin_mm) - self.margin_mm) < 1e-6

    def describe(self) -> str:
        return describe_region(self.labels, self.margin_mm)

    def validate(self) -> None:
        super().validate()
        if self.labels is not None:
            expect(
                len(self.labels) > 0 and all(v > 0 for v in self.labels), "labels", "positive label values", self.labels
            )
        expect(0 <= self.margin_mm <= 200, "margin_mm", "0 to 200 mm", self.margin_mm)

    @classmethod
    def from_calibration(cls, calibration: Calibration, labels, margin_mm: float) -> "OrganCalibration":
        return cls(**asdict(calibration), labels=list(labels) if labels else None, margin_mm=float(margin_mm))


def robust(values: np.ndarray):
    """Median and robust standard deviation (MAD x 1.4826) of the values."""
    median = float(np.median(values))
    scale = float(np.median(np.abs(values - median)) * MAD_TO_SIGMA)
    return median, scale


def scan_level(normalised: np.ndarray) -> float:
    """How much higher than normal slices a scan scores throughout: the median of its slices' normalised
    scores where that is positive and the scan has at least MIN_SLICES_FOR_SCAN_LEVEL of them, else 0.

    Subtracted before thresholding (`ScoreConfig.relative_to_scan`), it flags the slices that stand out of
    their own scan. Without it, a normal subject that scores high on every slice, one of the few held out
    to calibrate or a new patient, decides the threshold or fills the flag list (see
    docs/detector-experiments.md, section 16); the median ignores a finding that spans under half the scan.
    """
    values = np.asarray(normalised, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < MIN_SLICES_FOR_SCAN_LEVEL:
        return 0.0
    return max(0.0, float(np.median(values)))


def scan_levels(normalised: np.ndarray, case_index: np.ndarray) -> np.ndarray:
    """Each slice's `scan_level`, of the slices of its case."""
    normalised, case_index = np.asarray(normalised, dtype=float), np.asarray(case_index)
    levels = np.zeros(normalised.shape)
    for case in np.unique(case_index):
        mine = case_index == case
        levels[mine] = scan_level(normalised[mine])
    return levels


def calibrate(
    scores: np.ndarray,
    positions: np.ndarray,
    pixel_values: np.ndarray,
    num_cases: int,
    position_bins: int = 5,
    target_false_flag_rate: float = 0.05,
    pixel_false_positive_rate: float = 0.005,
    case_index: Optional[np.ndarray] = None,
) -> Calibration:
    """Calibrate from normal slices' scores, positions and a sample of their anomaly-map body pixels. With
    each slice's `case_index`, the threshold is set on scores relative to their scan (`scan_level`)."""
    scores = np.asarray(scores, dtype=float)
    positions = np.asarray(positions, dtype=float)
    if scores.size < MIN_SLICES:
        raise InputError(f"calibration needs at least {MIN_SLICES} normal slices, got {scores.size}.")
    if not np.isfinite(scores).all():
        raise InputError("calibration scores contain NaN or infinite values.")
    if not 0 < target_false_flag_rate < 0.5:
        raise InputError(f"target false-flag rate must be between 0 and 0.5, not {target_false_flag_rate}.")
    # Merge position bins until each holds enough slices for a stable median and MAD.
    bins = max(1, min(position_bins, scores.size // MIN_SLICES_PER_BIN))
    edges = np.linspace(0.0, 1.0, bins + 1)
    global_median, global_scale = robust(scores)
    global_scale = max(global_scale, 1e-6 * max(1.0, abs(global_median)), 1e-12)
    medians, scales = [], []
    for b in range(bins):
        upper = positions <= edges[b + 1] if b == bins - 1 else positions < edges[b + 1]
        members = scores[(positions >= edges[b]) & upper]
        if members.size >= MIN_SLICES_PER_BIN:
            median, scale = robust(members)
            scale = max(scale, 0.25 * global_scale)  # a near-constant bin must not blow scores up
        else:
            median, scale = global_median, global_scale
        medians.append(median)
        scales.append(scale)
    cal = Calibration(
        bin_edges=edges.tolist(),
        medians=medians,
        scales=scales,
        threshold=0.0,
        pixel_threshold=0.0,
        target_false_flag_rate=float(target_false_flag_rate),
        pixel_false_positive_rate=float(pixel_false_positive_rate),
        num_slices=int(scores.size),
        num_cases=int(num_cases),
        observed_false_flag_rate=0.0,
    )
    normalised = cal.normalise(scores, positions)
    if case_index is not None:
        normalised = normalised - scan_levels(normalised, case_index)
    cal.threshold = float(np.quantile(normalised, 1.0 - target_false_flag_rate, method="higher"))
    cal.observed_false_flag_rate = float(np.mean(normalised > cal.threshold))
    pixels = np.asarray(pixel_values, dtype=float)
    if pixels.size == 0:
        raise InputError("calibration needs body pixels of normal slices; none were found.")
    cal.pixel_threshold = float(max(np.quantile(pixels, 1.0 - pixel_false_positive_rate), 1e-6))
    return cal
