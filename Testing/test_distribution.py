"""Scans unlike the model's training data are said to be so, in the result, the summary and the CLI."""

import json

import numpy as np
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.distribution import distribution_warnings


def test_intensities_of_the_wrong_modality_are_named():
    normal = np.zeros(20)
    inside = np.ones(20, dtype=bool)
    assert distribution_warnings("CT", -1024.0, normal, 2.0, inside) == []
    (mr_as_ct,) = distribution_warnings("CT", 0.0, normal, 2.0, inside)
    assert "lowest value is 0" in mr_as_ct and "Hounsfield" in mr_as_ct
    (ct_as_mr,) = distribution_warnings("MR", -1024.0, normal, 2.0, inside)
    assert "-1024" in ct_as_mr and "MR" in ct_as_mr
    assert distribution_warnings("MR", 0.0, normal, 2.0, inside) == []


def test_most_slices_above_the_threshold_is_named_and_a_focal_finding_is_not():
    inside = np.ones(40, dtype=bool)
    lesion = np.where(np.arange(40) < 20, 5.0, 0.0)  # a large finding: half the slices
    assert distribution_warnings("CT", -1024.0, lesion, 2.0, inside) == []
    foreign = np.where(np.arange(40) < 33, 5.0, 0.0)  # 33 of 40, as the chest model on an abdomen
    (reason,) = distribution_warnings("CT", -1024.0, foreign, 2.0, inside)
    assert "82% of its slices" in reason
    # Slices outside the ROI do not count; too few slices say nothing.
    assert distribution_warnings("CT", -1024.0, foreign, 2.0, np.arange(40) >= 30) == []
    assert distribution_warnings("CT", -1024.0, np.full(5, 9.0), 2.0, np.ones(5, bool)) == []


def test_an_mr_like_scan_scored_with_a_ct_model_is_reported(tiny_model, phantom_normal_dir, tmp_path, capsys):
    image = sitk.ReadImage(str(phantom_normal_dir / "normal_000.nrrd"))
    mr_like = sitk.Cast(image, sitk.sitkFloat32) + 1024.0  # no air at -1000 any more, as on MR
    mr_like.CopyInformation(image)
    sitk.WriteImage(mr_like, str(tmp_path / "mr_like.nrrd"))
    out = tmp_path / "out"
    for scan in (phantom_normal_dir / "normal_000.nrrd", tmp_path / "mr_like.nrrd"):
        assert main(["score", "--model", str(tiny_model), "--input", str(scan), "--output", str(out),
                     "--device", "cpu"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "mr_like: WARNING: this scan does not look like the model's training data" in err
    assert "normal_000: WARNING" not in err
    summary = json.loads((out / "mr_like_summary.json").read_text())
    assert summary["out_of_distribution"] is True and "Hounsfield" in summary["warnings"][0]
    normal = json.loads((out / "normal_000_summary.json").read_text())
    assert normal["out_of_distribution"] is False and normal["warnings"] == []
