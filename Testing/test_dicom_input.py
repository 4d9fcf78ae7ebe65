"""A DICOM series folder scores like the same volume stored as NRRD."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.datasets import discover_cases
from AnomalyFlagLib.scoring import Scorer


def write_dicom_series(image: sitk.Image, folder) -> None:
    """One CT slice per file, with the tags that place it in space (as a scanner would write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.99.1"
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000e": series,
            "0020|000d": series + ".0",
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, direction[0:7:3] + direction[1:8:3])),
            "0020|0013": str(k + 1),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


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
