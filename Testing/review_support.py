"""Helpers for the review tests: synthetic scoring outputs written by the library's own writer."""

import os
import shutil
from pathlib import Path

import numpy as np
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.scored_case import write_case_files
from AnomalyFlagLib.results import CaseResult, SliceTable

THRESHOLD = 2.0


def make_case_outputs(folder, case="case1", num_slices=40, flagged=(3, 7, 8, 15, 20, 31), roi=False,
                      model_fingerprint="model-a-fingerprint", spacing=(1.0, 1.0, 2.5), seed=0,
                      model_name="tiny", score_offset=0.0, fraction_offset=0.0) -> Path:  # fmt: skip
    """Write <case>_slices.csv and <case>_summary.json with known scores: FLAGGED slices score above the
    threshold with distinct normalised scores (higher for later entries of FLAGGED reversed) and anomaly
    fractions ordered differently, so the two review orders differ."""
    rng = np.random.default_rng(seed)
    n = num_slices
    normalised = rng.uniform(-1.0, 1.5, n)
    fraction = rng.uniform(0.0, 0.01, n)
    for rank, k in enumerate(flagged):
        normalised[k] = THRESHOLD + 1.0 + 0.5 * rank + score_offset  # last in FLAGGED = highest score
        fraction[k] = 0.05 + 0.1 * ((rank * 5) % len(flagged)) / len(flagged) + fraction_offset
    in_roi = np.ones(n, dtype=bool)
    roi_info = None
    if roi:
        roi_info = {"labels": "any non-zero", "margin_mm": 10.0, "slices": [0, n - 1]}
    columns = {
        "index": np.arange(n),
        "z_mm": np.arange(n) * spacing[2],
        "position": np.linspace(0, 1, n),
        "reconstruction": normalised * 0.01 + 0.1,
        "feature": np.zeros(n),
        "score": normalised * 0.01 + 0.1,
        "score_from": np.arange(n),
        "normalised": normalised,
        "flagged": (normalised > THRESHOLD) & in_roi,
        "in_roi": in_roi,
        "anomaly_fraction": fraction,
    }
    geometry = Geometry((16, 16, n), spacing, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    result = CaseResult(case, geometry, SliceTable(columns), THRESHOLD, model_name, model_fingerprint, roi=roi_info)
    assert result.flagged_indices == sorted(flagged)
    write_case_files(result, folder)
    return Path(folder)


def without_write_permission_bypass():
    """Command prefix under which permission bits apply (root bypasses them otherwise), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
