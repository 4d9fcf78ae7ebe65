"""Tests for AnomalyFlagLib.evaluation.metrics: slice/pixel metrics and reports."""

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "AnomalyFlag"))

from AnomalyFlagLib.errors import InputError  # noqa: E402
from AnomalyFlagLib.evaluation.metrics import (  # noqa: E402
    PixelAccumulator,
    roc_curve,
    slice_metrics,
    write_report_json,
    write_report_png,
)


def _monai(scores, labels):
    from monai.metrics import compute_average_precision, compute_roc_auc

    y_pred = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(y_pred, y)), float(compute_average_precision(y_pred, y))


# ---------------------------------------------------------------------------------------------- slices


def test_perfect_separation_gives_auroc_1():
    scores = np.array([0.1, 0.2, 0.3, 2.0, 3.0])
    labels = np.array([False, False, False, True, True])
    m = slice_metrics(scores, labels, threshold=1.0)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["auprc"] == pytest.approx(1.0)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_reversed_separation_gives_auroc_0():
    scores = np.array([3.0, 2.0, 0.3, 0.2, 0.1])
    labels = np.array([False, False, True, True, True])
    assert slice_metrics(scores, labels, 1.0)["auroc"] == pytest.approx(0.0)


def test_random_scores_give_auroc_near_half():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=4000)
    labels = rng.random(4000) < 0.3
    m = slice_metrics(scores, labels, 0.0)
    assert abs(m["auroc"] - 0.5) < 0.04
    assert abs(m["auprc"] - labels.mean()) < 0.05


def test_hand_computed_sensitivity_specificity():
    # flagged = score > 1.0 -> indices 1, 3, 4, 6 ; positives = 0, 1, 3
    scores = [0.5, 1.5, 0.2, 2.0, 1.2, 1.0, 3.0]
    labels = [1, 1, 0, 1, 0, 0, 0]
    m = slice_metrics(scores, labels, 1.0)
    assert (m["true_positives"], m["false_negatives"]) == (2, 1)
    assert (m["false_positives"], m["true_negatives"]) == (2, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["false_flag_rate"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert (m["n_slices"], m["n_anomalous"], m["n_normal"], m["n_flagged"]) == (7, 3, 4, 4)
    assert m["threshold"] == 1.0  # a score equal to the threshold is not flagged


def test_auroc_matches_monai_and_roc_curve_area_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    labels = rng.random(300) < (0.2 + 0.5 * (scores > 0.5))
    m = slice_metrics(scores, labels, 0.5)
    auroc, ap = _monai(scores, labels)
    assert m["auroc"] == pytest.approx(auroc)
    assert m["auprc"] == pytest.approx(ap)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(thresholds) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc)


def test_single_class_gives_none_not_a_crash():
    only_normal = slice_metrics([0.1, 2.0, 0.3], [0, 0, 0], 1.0)
    assert only_normal["auroc"] is None and only_normal["auprc"] is None
    assert only_normal["sensitivity"] is None
    assert only_normal["specificity"] == pytest.approx(2 / 3)
    only_anomalous = slice_metrics([0.1, 2.0], [True, True], 1.0)
    assert only_anomalous["auroc"] is None and only_anomalous["specificity"] is None
    assert only_anomalous["false_flag_rate"] is None
    assert only_anomalous["sensitivity"] == 0.5
    nothing_flagged = slice_metrics([0.1, 0.2], [True, False], 1.0)
    assert nothing_flagged["precision"] is None
    with pytest.raises(InputError, match="both classes"):
        roc_curve([0.1, 0.2], [0, 0])


@pytest.mark.parametrize(
    "scores, labels, threshold, match",
    [
        ([0.1, 0.2], [1, 0, 0], 1.0, "scores and labels"),
        ([0.1, float("nan")], [1, 0], 1.0, "scores contains 1 NaN"),
        ([[0.1, 0.2]], [[1, 0]], 1.0, "scores must be a 1-D"),
        ([0.1, 0.2], [1, 2], 1.0, "labels must hold only 0/1"),
        ([0.1, 0.2], [1, 0], float("nan"), "threshold must be finite"),
        ([], [], 1.0, "scores is empty"),
        (["a", "b"], [1, 0], 1.0, "scores must hold numbers"),
    ],
)
def test_slice_metrics_input_errors(scores, labels, threshold, match):
    with pytest.raises(InputError, match=match):
        slice_metrics(scores, labels, threshold)


def test_infinite_scores_rank_highest():
    m = slice_metrics([0.0, 1.0, np.inf], [0, 0, 1], 2.0)
    assert m["auroc"] == 1.0 and m["true_positives"] == 1


# ----------------------------------------------------------------------------------------------- pixels


def _quantised_case(rng, shape, scale):
    mask = np.zeros(shape, bool)
    mask[1:3, 2:6, 3:7] = True
    levels = rng.integers(0, 40, size=shape) + 25 * mask  # anomalies tend to be brighter
    heatmap = (np.clip(levels, 0, 255).astype(np.uint8) * scale).astype(np.float32)
    roi = np.ones(shape, bool)
    roi[:, :, :2] = False
    roi[0, 0, :] = False
    return heatmap, mask, roi


def test_pixel_accumulator_equals_direct_computation():
    rng = np.random.default_rng(2)
    scale = 1.0 / 32  # uint8 * scale covers [0, 7.97]; bin width 8/4096 < scale
    acc = PixelAccumulator(max_value=8.0, n_bins=4096)
    all_values, all_mask = [], []
    for shape in [(4, 9, 10), (3, 8, 12), (5, 7, 9)]:
        heatmap, mask, roi = _quantised_case(rng, shape, scale)
        acc.add(heatmap, mask, roi=roi)
        all_values.append(heatmap[roi].astype(np.float64))
        all_mask.append(mask[roi])
    values = np.concatenate(all_values)
    truth = np.concatenate(all_mask)
    auroc, ap = _monai(values, truth)
    r = acc.result(threshold=1.0)
    assert r["histogram_exact"] is True
    assert r["pixel_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert r["pixel_auprc"] == pytest.approx(ap, abs=1e-12)
    assert r["n_voxels"] == values.size
    assert r["n_anomalous_voxels"] == int(truth.sum())
    assert r["n_cases"] == 3
    flagged = values > 1.0
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    assert (r["true_positive_voxels"], r["false_positive_voxels"], r["false_negative_voxels"]) == (tp, fp, fn)
    assert r["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["dice_exact"] is True
    # a threshold not registered in advance is answered from the (exact) histogram
    r2 = acc.result(threshold=0.9)
    flagged = values > 0.9
    tp = int(np.sum(flagged & truth))
    assert r2["true_positive_voxels"] == tp
    assert r2["dice"] == pytest.approx(2 * tp / (int(flagged.sum()) + int(truth.sum())))


def test_pixel_accumulator_without_roi_and_continuous_values_is_close():
    rng = np.random.default_rng(3)
    heatmap = rng.gamma(2.0, 0.4, size=(6, 20, 20))
    mask = rng.random(heatmap.shape) < 0.1
    heatmap[mask] += 0.5
    acc = PixelAccumulator(max_value=8.0, n_bins=4096)
    acc.add(heatmap, mask)
    auroc, ap = _monai(heatmap.ravel(), mask.ravel())
    r = acc.result()
    assert r["histogram_exact"] is False  # continuous values share bins
    assert r["pixel_auroc"] == pytest.approx(auroc, abs=2e-3)
    assert r["pixel_auprc"] == pytest.approx(ap, abs=5e-3)
    assert r["dice_exact"] is True  # threshold 1.0 is counted exactly in add()
    assert r["n_voxels"] == heatmap.size


def test_dice_hand_example():
    heatmap = np.array([[0.0, 1.5, 2.0], [0.5, 1.0, 3.0]])
    mask = np.array([[False, True, True], [True, False, False]])
    # flagged (> 1.0): (0,1) (0,2) (1,2) -> TP 2, FP 1, FN 1 -> Dice 4 / 6
    acc = PixelAccumulator(max_value=4.0, n_bins=64)
    acc.add(heatmap, mask)
    r = acc.result(1.0)
    assert r["dice"] == pytest.approx(4 / 6)
    assert (r["true_positive_voxels"], r["false_positive_voxels"], r["false_negative_voxels"]) == (2, 1, 1)
    # ROI excluding the false positive voxel
    roi = np.ones_like(mask)
    roi[1, 2] = False
    acc_roi = PixelAccumulator(max_value=4.0, n_bins=64)
    acc_roi.add(heatmap, mask, roi=roi)
    assert acc_roi.result()["dice"] == pytest.approx(4 / 5)
    assert acc_roi.result()["n_voxels"] == 5


def test_pixel_accumulator_single_class_and_errors():
    acc = PixelAccumulator()
    acc.add(np.zeros((2, 3)), np.zeros((2, 3), bool))
    r = acc.result()
    assert r["pixel_auroc"] is None and r["pixel_auprc"] is None and r["dice"] is None
    with pytest.raises(InputError, match="heatmap and mask"):
        acc.add(np.zeros((2, 3)), np.zeros((3, 2), bool))
    with pytest.raises(InputError, match="heatmap and roi"):
        acc.add(np.zeros((2, 3)), np.zeros((2, 3), bool), roi=np.ones(6, bool))
    with pytest.raises(InputError, match="heatmap contains 1 NaN"):
        acc.add(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(InputError, match="n_bins"):
        PixelAccumulator(n_bins=1)
    with pytest.raises(InputError, match="max_value"):
        PixelAccumulator(max_value=0)


# ---------------------------------------------------------------------------------------------- reports


def _synthetic_cases(rng, n_cases=5):
    cases = []
    for i in range(n_cases):
        n = int(rng.integers(40, 90))
        scores = rng.normal(0, 1, n)
        labels = np.zeros(n, bool)
        if i % 2 == 0:
            start = int(rng.integers(5, n - 12))
            labels[start : start + 8] = True
            scores[labels] += 3.5
        cases.append({"name": f"case-{i}", "positions": np.linspace(0, 1, n), "scores": scores, "labels": labels})
    return cases


def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 400 and image.shape[1] > 800
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert np.mean(rgb < 0.9) > 0.01  # some ink


def test_report_png_is_written_and_not_blank(tmp_path):
    rng = np.random.default_rng(4)
    cases = _synthetic_cases(rng)
    scores = np.concatenate([c["scores"] for c in cases])
    labels = np.concatenate([c["labels"] for c in cases])
    out = write_report_png(tmp_path / "report.png", scores, labels, 2.0, cases, max_cases=3)
    assert out == tmp_path / "report.png"
    _check_png(out)


def test_report_png_single_class_and_no_cases(tmp_path):
    rng = np.random.default_rng(5)
    scores = rng.normal(size=50)
    cases = [{"name": "normal only", "scores": scores, "labels": np.zeros(50, bool)}]  # slice index axis
    _check_png(write_report_png(tmp_path / "a.png", scores, np.zeros(50, bool), 1.5, cases))
    labels = scores > 1
    _check_png(write_report_png(tmp_path / "b.png", scores, labels, 1.5, []))


def test_report_png_input_errors(tmp_path):
    with pytest.raises(InputError, match="slice_scores and slice_labels"):
        write_report_png(tmp_path / "x.png", [0.1, 0.2], [True], 1.0, [])
    with pytest.raises(InputError, match=r"cases\[0\] \('c'\) scores and labels"):
        write_report_png(tmp_path / "x.png", [0.1], [True], 1.0, [{"name": "c", "scores": [1, 2], "labels": [1]}])
    with pytest.raises(InputError, match=r"cases\[0\] has no 'labels'"):
        write_report_png(tmp_path / "x.png", [0.1], [True], 1.0, [{"name": "c", "scores": [1]}])


def test_report_json_round_trip_with_nan(tmp_path):
    report = {
        "slice": slice_metrics([0.1, 2.0, 0.3], [0, 1, 0], 1.0),
        "nan": float("nan"),
        "inf": np.float32(np.inf),
        "array": np.array([1.0, np.nan, 3.0]),
        "count": np.int64(7),
        "flag": np.bool_(True),
        "nested": [{"x": np.float64("nan")}, (1, 2)],
        "path": tmp_path,
    }
    path = tmp_path / "report.json"
    path.write_text("old")
    assert write_report_json(path, report) == path
    loaded = json.loads(path.read_text())
    assert loaded["nan"] is None and loaded["inf"] is None
    assert loaded["array"] == [1.0, None, 3.0]
    assert loaded["count"] == 7 and loaded["flag"] is True
    assert loaded["nested"] == [{"x": None}, [1, 2]]
    assert loaded["slice"]["auroc"] == 1.0
    assert loaded["path"] == str(tmp_path)
    assert "NaN" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
    with pytest.raises(InputError, match="cannot write report JSON"):
        write_report_json(tmp_path / "missing" / "r.json", {"a": 1})
    with pytest.raises(InputError, match="report must be a dict"):
        write_report_json(path, [1, 2])
    assert not math.isnan(json.loads(path.read_text())["slice"]["specificity"])
