"""A DICOM series folder scores like the same volume stored as NRRD."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.io.cases import discover_cases
from AnomalyFlagLib.phantom import write_dicom_series
from AnomalyFlagLib.scoring import Scorer


def test_dicom_series_folder(tiny_model, phantom_anomalous_dir, tmp_path, capsys):
    image = sitk.ReadImage(str(phantom_anomalous_dir / "anomalous_001.nrrd"))
    write_dicom_series(image, tmp_path / "scans" / "patient_a")
    cases = discover_cases(tmp_path / "scans")
    assert [c.name for c in cases] == ["patient_a"]
    scorer = Scorer(tiny_model, device="cpu")
    from_dicom = scorer.score(tmp_path / "scans" / "patient_a")
    from_nrrd = scorer.score(image)
    assert from_dicom.geometry.matches(from_nrrd.geometry, tolerance_mm=1e-3)
    np.testing.assert_allclose(from_dicom.slices["normalised"], from_nrrd.slices["normalised"], atol=1e-4)
    assert main(["score", "--model", str(tiny_model), "--input", str(tmp_path / "scans" / "patient_a"),
                 "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0  # fmt: skip
    assert (tmp_path / "out" / "patient_a_summary.json").is_file()


def test_folder_without_volumes_is_an_error(tmp_path):
    from AnomalyFlagLib.errors import InputError

    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(InputError, match="holds no volumes"):
        discover_cases(tmp_path)
