"""Is a scan like the model's training data? Reasons to distrust every flag of a case.

A model trained on chest CT says nothing useful about a brain MR or an abdomen: scored anyway, most of
its slices come out anomalous, and a wall of flags reads like a sick patient. Two signs, each a named
reason: intensities that cannot be the model's modality (CT in Hounsfield units has air near -1000;
MR images have no such values), and more than three in four slices above the threshold, which a focal
finding, even a large tumour, rarely causes.
"""

from typing import List

import numpy as np

CT_AIR_MAX_HU = -500.0  # a CT slice stack has air outside the body (about -1000 HU) below this
CT_MIN_HU = -3100.0  # below the lowest value scanners store (-3024 HU with padding)
MIN_SLICES_FOR_SCORE_RULE = 8
MOST_SLICES = 0.75
MESSAGE = "this scan does not look like the model's training data"


def distribution_warnings(modality: str, lowest: float, normalised, threshold: float, in_roi) -> List[str]:
    """Reasons (empty when none) why a scored case is unlike the training data of a `modality` model."""
    reasons = []
    if modality == "CT" and lowest > CT_AIR_MAX_HU:
        reasons.append(
            f"its lowest value is {lowest:g}, but CT in Hounsfield units has air at about -1000 "
            "(an MR scan, or CT stored without its rescale slope and intercept?)"
        )
    elif modality == "CT" and lowest < CT_MIN_HU:
        reasons.append(f"it has values down to {lowest:g}, below any CT value in Hounsfield units")
    elif modality == "MR" and lowest <= CT_AIR_MAX_HU:
        reasons.append(f"it has values down to {lowest:g} as CT in Hounsfield units has; the model is for MR")
    scores = np.asarray(normalised, dtype=float)[np.asarray(in_roi, dtype=bool)]
    scores = scores[np.isfinite(scores)]
    share = float(np.mean(scores > threshold)) if len(scores) else 0.0
    if len(scores) >= MIN_SLICES_FOR_SCORE_RULE and share > MOST_SLICES:
        reasons.append(
            f"{share:.0%} of its slices score above the threshold, most of the scan is unlike the "
            "normal scans the model was trained on (a focal finding affects a few slices)"
        )
    return reasons
