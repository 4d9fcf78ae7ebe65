"""Segmentation failures: per-slice Dice and surface distance, the failure rule, how a slice score predicts
failures (AUROC, risk-coverage, Dice recovered) and `anomalyflag evaluate` with _seg/_reference files."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.evaluation.cases import evaluate_folder
from AnomalyFlagLib.evaluation.segmentation_failure import (
    SLICES_CSV_COLUMNS,
    FailureRule,
    failed_slices,
    failure_metrics,
    risk_coverage,
    slice_dice,
    write_failure_png,
)
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.orientation import AxialFrame
from AnomalyFlagLib.phantom import ORGAN_LABELS, make_phantom
from conftest import TINY_SIZE, TINY_SLICES

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _geometry(shape_kji, spacing=(0.5, 1.0, 3.0), direction=IDENTITY) -> Geometry:
    return Geometry(tuple(int(n) for n in shape_kji[::-1]), spacing, (0.0, 0.0, 0.0), direction)


def _brute_force_assd(a: np.ndarray, b: np.ndarray, spacing_rc) -> float:
    """Mean symmetric surface distance from all pairwise distances of the 4-connected contour pixels."""

    def edges(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing_rc)

    ea, eb = edges(a), edges(b)
    d = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    return float((d.min(axis=1).sum() + d.min(axis=0).sum()) / (len(ea) + len(eb)))


# ------------------------------------------------------------------------------------------ per-slice table


def test_offset_squares_and_empty_slices_by_hand():
    automatic = np.zeros((4, 20, 20), dtype=np.uint8)
    reference = np.zeros_like(automatic)
    automatic[0, 2:12, 2:12] = 1  # 10 x 10
    reference[0, 2:12, 4:14] = 1  # shifted 2 columns: 80 shared -> 2 * 80 / 200
    automatic[1, 2:12, 2:12] = 1
    reference[1, 2:12, 5:15] = 1  # shifted 3 columns: 70 shared
    automatic[3, 5:8, 5:8] = 1  # slice 2: both empty; slice 3: a contour where the reference has none
    table = slice_dice(automatic, reference, _geometry(automatic.shape))
    assert table["dice"].tolist() == [0.8, 0.7, 1.0, 0.0]
    assert table["automatic_voxels"].tolist() == [100, 100, 0, 9]
    assert table["reference_voxels"].tolist() == [100, 100, 0, 0]
    assert table["intersection_voxels"].tolist() == [80, 70, 0, 0]
    distance = table["surface_distance_mm"]
    assert np.isnan(distance[2]) and np.isnan(distance[3])  # no surface pair
    assert distance[0] > 0 and distance[1] > distance[0]


def test_surface_distance_single_pixels_identical_shapes_and_brute_force():
    a = np.zeros((3, 16, 16), dtype=bool)
    b = np.zeros_like(a)
    a[0, 5, 5] = b[0, 7, 8] = True  # 2 rows of 1.0 mm and 3 columns of 0.5 mm apart: sqrt(4 + 2.25)
    a[1, 3:10, 4:12] = b[1, 3:10, 4:12] = True
    rng = np.random.default_rng(3)
    a[2] = rng.random((16, 16)) < 0.35
    b[2] = rng.random((16, 16)) < 0.35
    frame = AxialFrame.from_geometry(_geometry(a.shape))
    assert (frame.row_spacing, frame.column_spacing) == (1.0, 0.5)
    distance = slice_dice(a, b, frame)["surface_distance_mm"]
    assert distance[0] == pytest.approx(2.5, abs=1e-5)
    assert distance[1] == pytest.approx(0.0, abs=1e-5)
    assert distance[2] == pytest.approx(_brute_force_assd(a[2], b[2], (1.0, 0.5)), abs=1e-4)


def test_slices_follow_the_scorers_axis_and_files_are_placed_on_the_grid(tmp_path):
    # Voxel axis i runs superior: axial slices are along i, as the scorer's slice table.
    direction = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    shape = (16, 16, 6)  # (k, j, i)
    geometry = _geometry(shape, spacing=(3.0, 1.0, 1.0), direction=direction)
    frame = AxialFrame.from_geometry(geometry)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:9, 3:10, 4] = 2  # the structure on slice i = 4
    labels[2:5, 3:6, 1] = 1  # another label on slice i = 1
    reference = labels.copy()
    reference[2:9, 3:10, 4] = 0
    reference[2:9, 4:11, 4] = 2
    files = {}
    for name, array in (("auto", labels), ("ref", reference)):
        image = sitk.GetImageFromArray(array)
        geometry.apply_to(image)
        files[name] = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(image, str(files[name]))
    table = slice_dice(files["auto"], files["ref"], geometry, labels=[2])
    assert len(table["dice"]) == frame.view(labels).shape[0] == 6
    assert table["automatic_voxels"].tolist() == [0, 0, 0, 0, 49, 0]
    assert table["dice"][4] == pytest.approx(2 * 42 / 98)
    assert slice_dice(labels, reference, frame)["automatic_voxels"].tolist() == [0, 9, 0, 0, 49, 0]
    with pytest.raises(InputError, match="needs the image's Geometry"):
        slice_dice(files["auto"], files["ref"], frame)


# ------------------------------------------------------------------------------------------ failure rule


def _rule_table():
    # slice: 0 Dice 0.79 | 1 Dice 0.8 | 2 extra contour | 3 small reference missed | 4 large reference missed
    #        5 small reference, poor Dice | 6 both empty
    return {
        "dice": np.array([0.79, 0.8, 0.0, 0.0, 0.0, 0.1, 1.0]),
        "automatic_voxels": np.array([100, 100, 10, 0, 0, 30, 0]),
        "reference_voxels": np.array([100, 100, 0, 30, 100, 30, 0]),
    }


def test_failure_rule_defaults():
    assert failed_slices(_rule_table()).tolist() == [True, False, True, True, True, False, False]


def test_failure_rule_options_switch():
    table = _rule_table()
    no_missing = failed_slices(table, FailureRule(count_missing=False))
    assert no_missing.tolist() == [True, False, False, False, True, False, False]  # a missed large one: Dice 0
    assert failed_slices(table, FailureRule(min_reference_voxels=20))[5]  # slice 5 is judged by Dice now
    assert failed_slices(table, FailureRule(dice_threshold=0.9))[1]
    assert not failed_slices(table, FailureRule(dice_threshold=0.7, count_missing=False))[0]
    # min_reference_voxels=0 still never judges an empty reference by Dice
    assert failed_slices(table, FailureRule(min_reference_voxels=0, count_missing=False))[2] == np.False_


@pytest.mark.parametrize(
    "kwargs",
    [{"dice_threshold": 0.0}, {"dice_threshold": 1.5}, {"dice_threshold": True}, {"min_reference_voxels": -1},
     {"min_reference_voxels": 2.5}],
)  # fmt: skip
def test_failure_rule_refuses_bad_options(kwargs):
    with pytest.raises(InputError):
        FailureRule(**kwargs)


# ------------------------------------------------------------------------------------------ failure metrics


def test_aurc_perfect_inverted_tied_and_random():
    dice = np.array([0.0, 1.0, 1.0, 1.0])  # one slice lost entirely
    failed = dice < 0.8
    flagged = np.array([True, False, False, False])
    perfect = failure_metrics([4, 3, 2, 1], failed, dice, flagged)
    assert perfect["risk_coverage"]["coverage"] == [1.0, 0.75, 0.5, 0.25]
    assert perfect["risk_coverage"]["risk"] == pytest.approx([0.25, 0.0, 0.0, 0.0])
    assert perfect["aurc"] == pytest.approx(0.25 * 0.25 / 2)
    assert perfect["aurc_optimal"] == pytest.approx(perfect["aurc"])
    assert perfect["aurc_random"] == pytest.approx(0.25 * 0.75)
    assert perfect["failure_auroc"] == pytest.approx(1.0) and perfect["failure_auprc"] == pytest.approx(1.0)
    inverted = failure_metrics([1, 2, 3, 4], failed, dice, flagged)
    assert inverted["risk_coverage"]["risk"] == pytest.approx([0.25, 1 / 3, 0.5, 1.0])
    assert inverted["aurc"] == pytest.approx(0.25 * ((0.25 + 1 / 3) / 2 + (1 / 3 + 0.5) / 2 + (0.5 + 1.0) / 2))
    assert inverted["failure_auroc"] == pytest.approx(0.0)
    tied = failure_metrics([1, 1, 1, 1], failed, dice, flagged)  # ties: the expected risk, = random
    assert tied["risk_coverage"]["risk"] == pytest.approx([0.25] * 4)
    assert tied["aurc"] == pytest.approx(tied["aurc_random"])
    rng = np.random.default_rng(0)
    dice = rng.random(2000)
    random_scores = failure_metrics(rng.random(2000), dice < 0.5, dice, np.zeros(2000, bool))
    assert random_scores["aurc"] == pytest.approx(random_scores["aurc_random"], rel=0.05)


def test_risk_coverage_ties_do_not_depend_on_input_order():
    scores = np.array([3.0, 2.0, 2.0, 2.0, 1.0, np.inf])
    loss = np.array([0.1, 0.9, 0.0, 0.3, 0.5, 0.2])
    order = np.array([5, 3, 1, 4, 0, 2])
    a, b = risk_coverage(scores, loss), risk_coverage(scores[order], loss[order])
    assert a["risk"] == pytest.approx(b["risk"].tolist())
    # inf first (0.2 removed), then 3.0 (0.1), then the tie group of mean loss 0.4, one by one
    total = loss.sum()
    assert a["risk"][1] == pytest.approx((total - 0.2) / 5)
    assert a["risk"][3] == pytest.approx((total - 0.3 - 0.4) / 3)


def test_dice_before_after_and_recovered_share_by_hand():
    dice = np.array([0.5, 1.0, 0.9, 0.2, 0.6])
    failed = np.array([True, False, False, True, True])
    flagged = np.array([True, False, True, True, False])
    m = failure_metrics([5, 1, 3, 4, 2], failed, dice, flagged)
    assert m["mean_dice_before"] == pytest.approx(3.2 / 5)
    assert m["mean_dice_after"] == pytest.approx(4.6 / 5)
    assert m["dice_recovered_share"] == pytest.approx((4.6 - 3.2) / (5 - 3.2))
    assert (m["n_slices"], m["n_failures"], m["n_flagged"], m["failures_flagged"]) == (5, 3, 3, 2)
    assert m["flagged_per_failure_found"] == pytest.approx(1.5)
    assert m["failure_sensitivity"] == pytest.approx(2 / 3)
    assert m["operating_point"] == {"coverage": pytest.approx(0.4), "risk": pytest.approx((0.0 + 0.4) / 2)}


def test_failure_metrics_undefined_values_are_none():
    perfect = failure_metrics([1.0, 2.0], [False, False], [1.0, 1.0], [True, True])
    assert perfect["failure_auroc"] is None and perfect["failure_auprc"] is None
    assert perfect["dice_recovered_share"] is None and perfect["flagged_per_failure_found"] is None
    assert perfect["failure_sensitivity"] is None and perfect["operating_point"]["risk"] is None
    missed = failure_metrics([1.0, 2.0], [True, False], [0.0, 1.0], [False, True])
    assert missed["flagged_per_failure_found"] is None and missed["dice_recovered_share"] == 0.0


@pytest.mark.parametrize(
    "args, match",
    [(([1.0], [True], [math.nan], [False]), "NaN"), (([1.0, 2.0], [True], [0.5], [False]), "differ"),
     (([1.0], [True], [1.5], [False]), r"\[0, 1\]"), (([], [], [], []), "empty"),
     (([math.nan], [True], [0.5], [False]), "NaN")],
)  # fmt: skip
def test_failure_metrics_input_errors(args, match):
    with pytest.raises(InputError, match=match):
        failure_metrics(*args)


def test_failure_png_is_written_and_not_blank(tmp_path):
    rng = np.random.default_rng(1)
    per_case = []
    for i in range(8):
        dice = np.clip(1.0 - rng.random(30) ** 4, 0, 1)
        per_case.append({"name": f"case{i}", "dice": dice, "failed": dice < 0.8, "flagged": rng.random(30) < 0.2})
    report = failure_metrics(
        rng.random(240), np.concatenate([c["failed"] for c in per_case]),
        np.concatenate([c["dice"] for c in per_case]), np.concatenate([c["flagged"] for c in per_case]),
    )  # fmt: skip
    path = write_failure_png(tmp_path / "f.png", per_case, report)
    assert path.stat().st_size > 20_000 and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(InputError, match="risk_coverage"):
        write_failure_png(tmp_path / "g.png", per_case, {})


# ------------------------------------------------------------------------------------------ anomalyflag evaluate


def test_evaluate_names_cases_without_any_ground_truth(tmp_path):
    phantom = make_phantom(4, 32, seed=0)
    phantom.save(tmp_path, "a")
    (tmp_path / "a_anomaly.nrrd").unlink()
    sitk.WriteImage(phantom.to_sitk(phantom.organs), str(tmp_path / "a_seg.nrrd"))
    phantom.save(tmp_path, "b")
    (tmp_path / "b_anomaly.nrrd").unlink()
    with pytest.raises(InputError, match=r"neither for a \(has a_seg.nrrd but no <case>_reference\), b\."):
        evaluate_folder(tmp_path / "no-model", tmp_path, tmp_path / "out")


@pytest.mark.parametrize("option", [["--failure-dice", "1.5"], ["--failure-dice", "x"], ["--failure-min-voxels", "-1"],
                                    ["--failure-labels", "0"]])  # fmt: skip
def test_evaluate_refuses_bad_failure_options(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "o"), *option])
    assert exc.value.code == 2 and option[0] in capsys.readouterr().err


def test_evaluate_help_names_the_failure_options(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for option in ("--failure-dice", "--failure-min-voxels", "--no-missing-contour-failures", "--failure-labels"):
        assert option in text


def _write_failure_cases(folder):
    """Two phantom cases: a_* with an anomaly mask, b_* without; both with the liver as reference and an
    automatic contour that misses it on some slices, shrinks it on one and adds a blob on another."""
    perturbed = {}
    for name, seed in (("a", 11), ("b", 12)):
        phantom = make_phantom(TINY_SLICES, TINY_SIZE, seed=seed, anomalies=["hyperdense_lesion"])
        phantom.save(folder, name)
        (folder / f"{name}_organs.nrrd").unlink()
        liver = (phantom.organs == ORGAN_LABELS["liver"]).astype(np.uint8)
        sitk.WriteImage(phantom.to_sitk(liver), str(folder / f"{name}_reference.nrrd"))
        auto = liver.copy()
        present = np.flatnonzero(liver.any(axis=(1, 2)))
        erased, shrunk = present[len(present) // 2 : len(present) // 2 + 3], present[1]
        auto[erased] = 0
        rows = np.flatnonzero(auto[shrunk].any(axis=1))
        auto[shrunk, rows[: len(rows) // 2]] = 0
        blob = int(np.flatnonzero(~liver.any(axis=(1, 2)))[0])
        auto[blob, 30:36, 30:36] = 1
        perturbed[name] = {"erased": erased.tolist(), "shrunk": int(shrunk), "blob": blob, "auto": auto, "ref": liver}
        if name == "a":  # as Slicer saves it: a .seg.nrrd cropped to the segment's extent
            image = phantom.to_sitk(auto)
            k, j, i = (np.flatnonzero(auto.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
            cropped = image[int(i[0]) : int(i[-1]) + 1, int(j[0]) : int(j[-1]) + 1, int(k[0]) : int(k[-1]) + 1]
            sitk.WriteImage(cropped, str(folder / "a.seg.nrrd"))
        else:
            (folder / "b_anomaly.nrrd").unlink()
            sitk.WriteImage(phantom.to_sitk(auto), str(folder / "b_seg.nrrd"))
    return perturbed


@pytest.mark.slow
def test_evaluate_reports_segmentation_failures(flagging_model, tmp_path, capsys):
    folder = tmp_path / "cases"
    perturbed = _write_failure_cases(folder)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(flagging_model), "--input", str(folder), "--output", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "slice AUROC" in printed and "segmentation failures:" in printed
    report = json.loads((out / "evaluation.json").read_text())
    assert report["slice"]["n_slices"] == 24  # anomaly metrics over case a only, the one with a mask
    assert [c["anomalous_slices"] is None for c in report["cases"]] == [False, True]
    failure = report["segmentation_failure"]
    assert failure["rule"] == {"dice_threshold": 0.8, "min_reference_voxels": 50, "count_missing": True}
    assert failure["n_cases"] == 2 and failure["n_slices"] == 48
    assert failure["thresholds"] == {"whole_body": report["threshold"], "organ_aware": None}  # no organ calibration
    assert [(c["score_kind"], c["threshold"]) for c in failure["cases"]] == [("body", report["threshold"])] * 2
    assert failure["n_flagged"] > 0 and failure["n_failures"] > 0  # the flagging model flags 40% of normal slices
    assert (out / "segmentation_failure.png").stat().st_size > 20_000
    assert (out / "evaluation.png").is_file()

    with open(out / "segmentation_failure_slices.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SLICES_CSV_COLUMNS and len(rows) == 48
    for case in failure["cases"]:
        name, truth = case["name"], perturbed[case["name"]]
        table = slice_dice(truth["auto"], truth["ref"], AxialFrame.from_geometry(_geometry(truth["ref"].shape)))
        mine = [r for r in rows if r["case"] == name]
        assert [float(r["dice"]) for r in mine] == pytest.approx(table["dice"].tolist())
        assert [int(r["reference_voxels"]) for r in mine] == table["reference_voxels"].tolist()
        failed = failed_slices(table)
        assert case["failed_slices"] == np.flatnonzero(failed).tolist()
        assert set(truth["erased"]) | {truth["blob"]} <= set(case["failed_slices"])
        with open(out / "cases" / f"{name}_slices.csv") as f:
            scored = list(csv.DictReader(f))
        ranked = [float(r["normalised"]) if r["in_roi"] == "1" else -np.inf for r in scored]  # outside: never flagged
        assert [float(r["score"]) for r in mine] == pytest.approx(ranked, rel=1e-5)
        assert case["flagged_slices"] == [int(r["index"]) for r in scored if r["flagged"] == "1"]
        assert case["mean_dice_before"] == pytest.approx(float(np.mean(table["dice"])))
        assert case["slices"] == 24 and case["failures"] == int(failed.sum())
    assert report["cases"][0]["roi"] is not None  # scored with the automatic segmentation as its ROI

    pooled = failure_metrics([float(r["score"]) for r in rows], [r["failed"] == "1" for r in rows],
                             [float(r["dice"]) for r in rows], [r["flagged"] == "1" for r in rows])  # fmt: skip
    for key in ("n_failures", "n_flagged", "failures_flagged", "flagged_per_failure_found", "dice_recovered_share"):
        assert failure[key] == pytest.approx(pooled[key]), key
    for key in ("failure_auroc", "failure_auprc", "aurc", "aurc_random", "mean_dice_before", "mean_dice_after"):
        assert failure[key] == pytest.approx(pooled[key], abs=1e-6), key
    assert failure["risk_coverage"]["coverage"][0] == 1.0 and len(failure["risk_coverage"]["risk"]) == 48

    # The rule's options reach the report; without anomaly masks the anomaly metrics are absent.
    (folder / "a_anomaly.nrrd").unlink()
    out2 = tmp_path / "eval2"
    options = ["--failure-dice", "0.95", "--failure-min-voxels", "5", "--no-missing-contour-failures"]
    assert main(["evaluate", "--model", str(flagging_model), "--input", str(folder), "--output", str(out2),
                 "--device", "cpu", *options]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "slice AUROC" not in printed and "segmentation failures:" in printed
    report2 = json.loads((out2 / "evaluation.json").read_text())
    assert report2["slice"] is None and report2["pixel"] is None and not (out2 / "evaluation.png").exists()
    rule2 = report2["segmentation_failure"]["rule"]
    assert rule2 == {"dice_threshold": 0.95, "min_reference_voxels": 5, "count_missing": False}
    blob_b = perturbed["b"]["blob"]
    assert blob_b not in report2["segmentation_failure"]["cases"][1]["failed_slices"]  # an extra contour only
