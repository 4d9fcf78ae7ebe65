"""`anomalyflag evaluate`: score cases that have ground truth and report the metrics.

Two kinds of ground truth, either or both per case:

- An anomaly mask (`<case>_anomaly`, `_label`, `_mask`): a slice is anomalous when the mask has a voxel in
  it. Pixel metrics count voxels inside the body only (air would inflate them), on the heatmap's
  anomaly-index scale, where the calibrated pixel threshold is 1.0.
- The deployed model's automatic segmentation (`<case>_seg`) and a reference contour (`<case>_reference`):
  per slice the Dice of the one against the other, the failed slices by a `FailureRule`, and how well the
  slice score and flags predict those failures (`segmentation_failure`).
"""

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..atomic_files import write_text_atomic
from ..errors import InputError
from ..io.cases import Case, discover_cases
from ..io.scored_case import CaseOutputs, prepare_output_dir
from ..io.slice_source import open_source
from ..io.volumes import read_image
from ..preprocessing import body_mask, volume_reference
from ..roi import check_labels, roi_on_image_grid
from ..scoring import HEATMAP_SCALE, Scorer
from .metrics import PixelAccumulator, slice_metrics, write_report_json, write_report_png
from .segmentation_failure import (
    FailureRule,
    failed_slices,
    failure_metrics,
    failure_slices_csv,
    flag_ranking,
    slice_dice,
    write_failure_png,
)

REPORT_JSON = "evaluation.json"
REPORT_PNG = "evaluation.png"
FAILURE_PNG = "segmentation_failure.png"
FAILURE_SLICES_CSV = "segmentation_failure_slices.csv"


def _body(array: np.ndarray, threshold: float, reference=None) -> np.ndarray:
    """Body voxels of a (slice, row, column) volume, in model units (MRI: the volume's percentile range)."""
    x = torch.from_numpy(np.array(array, dtype=np.float32))
    if reference is not None:
        x = (x - reference[0]) / max(reference[1] - reference[0], 1e-6)
    return body_mask(x[:, None], threshold)[:, 0].numpy()


def _has_contours(case: Case) -> bool:
    return case.segmentation is not None and case.reference is not None


def _check_ground_truth(cases: Sequence[Case]) -> None:
    """Every case needs an anomaly mask, or an automatic segmentation and a reference contour."""
    missing = [c for c in cases if c.mask is None and not _has_contours(c)]
    if not missing:
        return
    details = []
    for c in missing:
        if c.segmentation is not None:
            details.append(f"{c.name} (has {c.segmentation.name} but no <case>_reference)")
        elif c.reference is not None:
            details.append(f"{c.name} (has {c.reference.name} but no <case>_seg)")
        else:
            details.append(c.name)
    raise InputError(
        "evaluation needs for every case a ground-truth anomaly mask (<case>_anomaly, _label or _mask), or "
        "the automatic segmentation and a reference contour (<case>_seg and <case>_reference); "
        f"neither for {', '.join(details)}."
    )


def _failure_case(case: Case, source, result, rule: FailureRule, labels, automatic: np.ndarray) -> dict:
    """The per-slice table of a case with contours, its failed slices and its own figures."""
    reference = roi_on_image_grid(
        case.reference, source.geometry, labels, name=f"reference contour '{case.reference}'", allow_empty=True
    )
    table = slice_dice(automatic, reference, source.frame)
    normalised = flag_ranking(result.slices)
    flagged = np.asarray(result.slices["flagged"], dtype=bool)
    if len(table["dice"]) != len(normalised):
        raise InputError(
            f"case '{case.name}': {len(table['dice'])} contour slices but {len(normalised)} scored slices."
        )
    failed = failed_slices(table, rule)
    metrics = failure_metrics(normalised, failed, table["dice"], flagged)
    distance = table["surface_distance_mm"]
    summary = {
        "name": case.name,
        "segmentation": str(case.segmentation),
        "reference": str(case.reference),
        "slices": len(normalised),
        "failures": metrics["n_failures"],
        "flagged": metrics["n_flagged"],
        "failures_flagged": metrics["failures_flagged"],
        "failed_slices": np.flatnonzero(failed).tolist(),
        "flagged_slices": np.flatnonzero(flagged).tolist(),
        "score_kind": (result.roi or {}).get("score_kind", "body"),
        "threshold": result.threshold,
        "mean_dice_before": metrics["mean_dice_before"],
        "mean_dice_after": metrics["mean_dice_after"],
        "mean_surface_distance_mm": float(np.nanmean(distance)) if np.isfinite(distance).any() else None,
        "failure_auroc": metrics["failure_auroc"],
    }
    return {"name": case.name, "scores": normalised, "flagged": flagged, "failed": failed, "summary": summary, **table}


def _pooled_failures(per_case: list, rule: FailureRule, labels, thresholds: dict, output: Path) -> dict:
    pooled = failure_metrics(
        np.concatenate([c["scores"] for c in per_case]),
        np.concatenate([c["failed"] for c in per_case]),
        np.concatenate([c["dice"] for c in per_case]),
        np.concatenate([c["flagged"] for c in per_case]),
    )
    write_text_atomic(output / FAILURE_SLICES_CSV, failure_slices_csv(per_case))
    write_failure_png(
        output / FAILURE_PNG,
        per_case,
        pooled,
        title=f"Flags against failures of the automatic segmentation, {len(per_case)} case(s)",
    )
    return {
        "rule": rule.to_dict(),
        "labels": list(labels) if labels else "any non-zero",
        "thresholds": thresholds,
        "score": "normalised (organ-aware inside the segmentation where the model has that calibration)",
        "n_cases": len(per_case),
        **pooled,
        "cases": [c["summary"] for c in per_case],
    }


def evaluate_folder(
    model,
    input_path,
    output,
    device: str = "auto",
    batch_size: Optional[int] = None,
    failure_rule: Optional[FailureRule] = None,
    failure_labels: Optional[Sequence[int]] = None,
) -> dict:
    """Score every case under `input_path` against its ground truth: the *_anomaly/_label/_mask mask (slice
    and pixel metrics, over the cases that have one) and/or the automatic segmentation `<case>_seg` with
    a reference `<case>_reference` (`segmentation_failure`, by `failure_rule`, default FailureRule();
    `failure_labels`: the label values of the structure in both, default any non-zero). A case with a
    segmentation is scored with it as the ROI."""
    output = Path(output)
    rule = failure_rule or FailureRule()
    failure_labels = check_labels(failure_labels)
    cases = discover_cases(input_path, "evaluation input")
    _check_ground_truth(cases)
    scorer = Scorer(model, device=device, batch_size=batch_size)
    prepare_output_dir(output)
    prepare_output_dir(output / "cases")
    body_hu = scorer.bundle.preprocess.body_threshold
    pixels = PixelAccumulator(max_value=255 * HEATMAP_SCALE, n_bins=256, dice_thresholds=(1.0,))
    scores, labels, per_case, failure_cases = [], [], [], []
    for case in cases:
        image = read_image(case.image, f"volume '{case.image}'")
        source = open_source(image, name=f"volume '{case.image}'")
        automatic = None
        if case.segmentation is not None:
            automatic = roi_on_image_grid(
                case.segmentation,
                source.geometry,
                failure_labels,
                name=f"automatic segmentation '{case.segmentation}'",
                allow_empty=True,
            )
        roi = case.segmentation if automatic is not None and automatic.any() else None  # an empty one restricts nothing
        with CaseOutputs(output / "cases", case.name) as outputs:
            result = scorer.score(source, name=case.name, roi=roi, roi_labels=failure_labels if roi else None)
            outputs.publish(result)
        normalised = result.slices["normalised"]
        entry = {
            "name": case.name,
            "slices": len(normalised),
            "anomalous_slices": None,
            "flagged_slices": result.flagged_indices,
            "auroc": None,
            "roi": result.roi,
        }
        if _has_contours(case):
            failure_cases.append(_failure_case(case, source, result, rule, failure_labels, automatic))
        if case.mask is not None:
            truth = source.frame.view(
                roi_on_image_grid(case.mask, source.geometry, name=f"mask '{case.mask}'", allow_empty=True)
            )
            heat = source.frame.view(result.heatmap).astype(np.float32) * HEATMAP_SCALE
            volume = source.frame.view(sitk.GetArrayViewFromImage(image))
            reference = volume_reference(source, scorer.bundle.preprocess)
            pixels.add(heat, truth, roi=_body(volume, body_hu, reference))
            slice_truth = truth.any(axis=(1, 2))
            scores.append(normalised)
            labels.append(slice_truth)
            entry.update(
                {
                    "anomalous_slices": np.flatnonzero(slice_truth).tolist(),
                    "auroc": slice_metrics(normalised, slice_truth, result.threshold)["auroc"],
                    "scores": normalised.tolist(),
                    "labels": slice_truth.tolist(),
                    "positions": result.slices["position"].tolist(),
                }
            )
        per_case.append(entry)
    threshold = scorer.calibration.threshold
    report = {
        "model": scorer.bundle.name,
        "model_fingerprint": scorer.bundle.fingerprint(),
        "input": str(input_path),
        "threshold": threshold,
        "pixel_threshold": 1.0,
        "slice": None,
        "pixel": None,
        "cases": [{k: v for k, v in c.items() if k not in ("scores", "labels", "positions")} for c in per_case],
    }
    if scores:
        all_scores, all_labels = np.concatenate(scores), np.concatenate(labels)
        report["slice"] = slice_metrics(all_scores, all_labels, threshold)
        report["pixel"] = pixels.result(threshold=1.0)
        masked = [c for c in per_case if "scores" in c]
        write_report_png(
            output / REPORT_PNG,
            all_scores,
            all_labels,
            threshold,
            cases=masked,
            title=f"{scorer.bundle.name} on {len(masked)} case(s) from {Path(input_path).name}",
        )
    if failure_cases:
        organ = scorer.bundle.organ_calibration
        thresholds = {"whole_body": threshold, "organ_aware": organ.threshold if organ is not None else None}
        report["segmentation_failure"] = _pooled_failures(failure_cases, rule, failure_labels, thresholds, output)
    stale = ([] if scores else [REPORT_PNG]) + ([] if failure_cases else [FAILURE_PNG, FAILURE_SLICES_CSV])
    for name in stale:  # a picture of an earlier run beside this report would mislead
        (output / name).unlink(missing_ok=True)
    write_report_json(output / REPORT_JSON, report)
    return report
