"""Organ-aware scores: calibrated on normal scans with their contours, used inside a case's segmentation."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.io.cases import discover_cases
from AnomalyFlagLib.io.montage import MontageSlices
from AnomalyFlagLib.phantom import ORGAN_LABELS, make_phantom
from AnomalyFlagLib.scoring import Scorer
from AnomalyFlagLib.training import recalibrate
from conftest import TINY_SIZE, TINY_SLICES


def _case_with_liver_contour(folder, name, seed, anomalies=()):
    phantom = make_phantom(num_slices=TINY_SLICES, size=TINY_SIZE, seed=seed, anomalies=list(anomalies))
    phantom.save(folder, name)
    liver = (phantom.organs == ORGAN_LABELS["liver"]).astype(np.uint8)
    sitk.WriteImage(phantom.to_sitk(liver), str(folder / f"{name}_seg.nrrd"), True)
    return phantom


@pytest.fixture(scope="module")
def contoured_normals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contoured_normals")
    for i in range(3):
        _case_with_liver_contour(folder, f"normal_{i:03d}", seed=100 + i)
    return folder


@pytest.fixture(scope="module")
def organ_model(tiny_model, contoured_normals, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "organ"
    return recalibrate(tiny_model, contoured_normals, out, device="cpu", log=lambda s: None)


def test_cases_find_their_own_segmentation(contoured_normals):
    cases = discover_cases(contoured_normals)
    assert [c.name for c in cases] == ["normal_000", "normal_001", "normal_002"]
    assert all(c.segmentation == contoured_normals / f"{c.name}_seg.nrrd" for c in cases)


@pytest.mark.slow
def test_organ_calibration_is_stored_beside_the_whole_body_one(organ_model, tiny_model):
    bundle = load_bundle(organ_model)
    organ, body = bundle.organ_calibration, bundle.calibration
    assert organ is not None and load_bundle(tiny_model).organ_calibration is None
    assert organ.labels is None and organ.margin_mm == 10.0 and organ.applies(None, 10.0)
    assert not organ.applies([2], 10.0) and not organ.applies(None, 5.0)
    assert organ.num_cases == 3 and organ.num_slices < body.num_slices  # only slices that show the liver
    assert organ.target_false_flag_rate == body.target_false_flag_rate
    assert abs(organ.observed_false_flag_rate - organ.target_false_flag_rate) <= 0.05
    assert bundle.fingerprint() != load_bundle(tiny_model).fingerprint()


@pytest.mark.slow
def test_inside_the_segmentation_slices_get_the_organ_aware_score(organ_model, tmp_path):
    phantom = _case_with_liver_contour(tmp_path, "case", seed=7, anomalies=[{"kind": "metal_stent"}])
    scorer = Scorer(organ_model, device="cpu")
    whole = scorer.score(str(tmp_path / "case.nrrd"))
    kept = MontageSlices(max_slices=2)
    organ = scorer.score(str(tmp_path / "case.nrrd"), roi=str(tmp_path / "case_seg.nrrd"), slice_keeper=kept)
    inside = organ.slices["in_roi"]
    # the montage keeps what the flags rank: slices inside the ROI, by the organ-aware score
    assert kept.slices and set(kept.slices) <= set(np.flatnonzero(inside).tolist())
    own = scorer.bundle.organ_calibration.normalise(organ.slices["score"], organ.slices["position"])
    ranked = sorted(np.flatnonzero(inside), key=lambda k: -own[k])
    assert set(kept.slices) == set(int(k) for k in ranked[: kept.keep])
    assert inside.any() and not inside.all()
    assert set(organ.slices["score_kind"][inside]) == {"organ"} and set(organ.slices["score_kind"][~inside]) == {"body"}
    assert set(whole.slices["score_kind"]) == {"body"}
    assert organ.threshold == scorer.bundle.organ_calibration.threshold != whole.threshold
    assert "organ-aware" in organ.roi["score"]
    # the organ-aware score pools the map inside the liver and its margin only: never above the whole slice's
    assert (organ.slices["score"][inside] <= whole.slices["score"][inside] + 1e-5).all()
    assert not organ.slices["flagged"][~inside].any()
    assert phantom.anomaly_mask.any()

    other_margin = scorer.score(str(tmp_path / "case.nrrd"), roi=str(tmp_path / "case_seg.nrrd"), roi_margin_mm=5.0)
    assert (
        set(other_margin.slices["score_kind"]) == {"body"}
        and "not for any non-zero label plus 5 mm" in (other_margin.roi["score"])
    )
    assert other_margin.threshold == whole.threshold


@pytest.mark.slow
def test_each_case_of_a_folder_uses_its_own_segmentation(organ_model, tmp_path, capsys):
    scans = tmp_path / "scans"
    _case_with_liver_contour(scans, "a", seed=11)
    _case_with_liver_contour(scans, "b", seed=12)
    make_phantom(num_slices=TINY_SLICES, size=TINY_SIZE, seed=13).save(scans, "c")  # no contour
    out = tmp_path / "out"
    assert main(["score", "--model", str(organ_model), "--input", str(scans), "--output", str(out)]) == 0
    import csv
    import json

    for name, kinds in (("a", {"organ", "body"}), ("b", {"organ", "body"}), ("c", {"body"})):
        summary = json.loads((out / f"{name}_summary.json").read_text())
        with open(out / f"{name}_slices.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["score_kind"] for r in rows} == kinds
        assert (summary["roi"] is None) == (name == "c")
    seg_a = sitk.GetArrayFromImage(sitk.ReadImage(str(scans / "a_seg.nrrd")))
    with open(out / "a_slices.csv") as f:
        in_roi = [r["in_roi"] == "1" for r in csv.DictReader(f)]
    assert any(in_roi) and sum(in_roi) >= int(seg_a.any(axis=(1, 2)).sum())  # the contour's slices and margin
    from AnomalyFlagLib.review.session import ReviewSession, load_sidecar

    with ReviewSession.open(out, "a", "ann"):  # the organ-aware score already looks inside the contour
        pass
    with ReviewSession.open(out, "c", "ann"):
        pass
    assert load_sidecar(out, "a")["order"] == "normalised" and load_sidecar(out, "c")["order"] == "normalised"


@pytest.mark.slow
def test_slicer_table_and_chart_say_which_score_flagged(organ_model, tmp_path):
    from AnomalyFlagMRML.scoreTable import createScoreChart, createScoreTable
    from mrml_support import scene_fixture

    _case_with_liver_contour(tmp_path, "case", seed=7)
    scorer = Scorer(organ_model, device="cpu")
    for roi, expected in ((str(tmp_path / "case_seg.nrrd"), True), (None, False)):
        result = scorer.score(str(tmp_path / "case.nrrd"), roi=roi)
        fixture = scene_fixture()
        scene = next(fixture)
        try:
            table = createScoreTable(result, scene=scene)
            kinds = table.GetTable().GetColumnByName("score_kind")
            assert [kinds.GetValue(i) for i in range(kinds.GetNumberOfTuples())] == result.slices["score_kind"].tolist()
            chart = createScoreChart(table, result.threshold, scene=scene)
            names = [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
            assert any("organ-aware threshold" in n for n in names) == expected
        finally:
            fixture.close()


@pytest.mark.slow
def test_evaluate_reports_the_thresholds_the_flags_used(organ_model, tmp_path):
    import json
    import shutil

    cases = tmp_path / "cases"
    _case_with_liver_contour(cases, "a", seed=21, anomalies=[{"kind": "fluid"}])
    shutil.copy(cases / "a_seg.nrrd", cases / "a_reference.nrrd")
    assert main(["evaluate", "--model", str(organ_model), "--input", str(cases), "--output", str(tmp_path / "r"),
                 "--device", "cpu"]) == 0  # fmt: skip
    failure = json.loads((tmp_path / "r" / "evaluation.json").read_text())["segmentation_failure"]
    organ = load_bundle(organ_model).organ_calibration
    assert failure["thresholds"]["organ_aware"] == organ.threshold
    assert [(c["score_kind"], c["threshold"]) for c in failure["cases"]] == [("organ", organ.threshold)]
