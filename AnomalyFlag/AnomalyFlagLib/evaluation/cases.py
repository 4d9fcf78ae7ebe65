"""`anomalyflag evaluate`: score cases that have ground-truth anomaly masks and report the metrics.

Slice labels: a slice is anomalous when its ground-truth mask has a voxel in it. Pixel metrics count
voxels inside the body only (air would inflate them), on the heatmap's anomaly-index scale, where the
calibrated pixel threshold is 1.0.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..io.cases import discover_cases
from ..io.scored_case import CaseOutputs, prepare_output_dir
from ..io.slice_source import open_source
from ..io.volumes import read_image
from ..preprocessing import body_mask, volume_reference
from ..roi import roi_on_image_grid
from ..scoring import HEATMAP_SCALE, Scorer
from .metrics import PixelAccumulator, slice_metrics, write_report_json, write_report_png


def _body(array: np.ndarray, threshold: float, reference=None) -> np.ndarray:
    """Body voxels of a (slice, row, column) volume, in model units (MRI: the volume's percentile range)."""
    x = torch.from_numpy(np.array(array, dtype=np.float32))
    if reference is not None:
        x = (x - reference[0]) / max(reference[1] - reference[0], 1e-6)
    return body_mask(x[:, None], threshold)[:, 0].numpy()


def evaluate_folder(model, input_path, output, device: str = "auto", batch_size: Optional[int] = None) -> dict:
    """Score every case under `input_path` against its *_anomaly/_label/_mask ground truth."""
    output = Path(output)
    cases = discover_cases(input_path, "evaluation input")
    unlabelled = [c.name for c in cases if c.mask is None]
    if unlabelled:
        raise InputError(f"evaluation needs a ground-truth mask for every case; none for {', '.join(unlabelled)}.")
    scorer = Scorer(model, device=device, batch_size=batch_size)
    prepare_output_dir(output)
    prepare_output_dir(output / "cases")
    body_hu = scorer.bundle.preprocess.body_threshold
    pixels = PixelAccumulator(max_value=255 * HEATMAP_SCALE, n_bins=256, dice_thresholds=(1.0,))
    scores, labels, per_case = [], [], []
    for case in cases:
        image = read_image(case.image, f"volume '{case.image}'")
        source = open_source(image, name=f"volume '{case.image}'")
        with CaseOutputs(output / "cases", case.name) as outputs:
            result = scorer.score(source, name=case.name)
            outputs.publish(result)
        truth = source.frame.view(roi_on_image_grid(case.mask, source.geometry, name=f"mask '{case.mask}'",
                                                    allow_empty=True))  # fmt: skip
        heat = source.frame.view(result.heatmap).astype(np.float32) * HEATMAP_SCALE
        volume = source.frame.view(sitk.GetArrayViewFromImage(image))
        reference = volume_reference(source, scorer.bundle.preprocess)
        pixels.add(heat, truth, roi=_body(volume, body_hu, reference))
        slice_truth = truth.any(axis=(1, 2))
        normalised = result.slices["normalised"]
        scores.append(normalised)
        labels.append(slice_truth)
        case_metrics = slice_metrics(normalised, slice_truth, result.threshold)
        per_case.append({
            "name": case.name,
            "slices": len(normalised),
            "anomalous_slices": np.flatnonzero(slice_truth).tolist(),
            "flagged_slices": result.flagged_indices,
            "auroc": case_metrics["auroc"],
            "scores": normalised.tolist(),
            "labels": slice_truth.tolist(),
            "positions": result.slices["position"].tolist(),
        })  # fmt: skip
    all_scores, all_labels = np.concatenate(scores), np.concatenate(labels)
    threshold = scorer.calibration.threshold
    report = {
        "model": scorer.bundle.name,
        "model_fingerprint": scorer.bundle.fingerprint(),
        "input": str(input_path),
        "threshold": threshold,
        "pixel_threshold": 1.0,
        "slice": slice_metrics(all_scores, all_labels, threshold),
        "pixel": pixels.result(threshold=1.0),
        "cases": [{k: v for k, v in c.items() if k not in ("scores", "labels", "positions")} for c in per_case],
    }
    write_report_json(output / "evaluation.json", report)
    write_report_png(output / "evaluation.png", all_scores, all_labels, threshold, cases=per_case,
                     title=f"{scorer.bundle.name} on {len(cases)} case(s) from {Path(input_path).name}")  # fmt: skip
    return report
