"""scripts/failure_benchmark.py: which failed slices an anomaly at the organ can explain."""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import failure_benchmark as fb  # noqa: E402
from AnomalyFlagLib.geometry import Geometry  # noqa: E402
from AnomalyFlagLib.io.cases import Case  # noqa: E402


def _write(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


def test_anomaly_at_organ_counts_the_organ_and_its_margin_only(tmp_path):
    liver = np.zeros((5, 60, 60), dtype=np.uint8)
    liver[0:4, 20:40, 20:40] = 1
    anomaly = np.zeros_like(liver)
    anomaly[0, 30, 30] = 1  # inside the liver
    anomaly[1, 30, 45] = 1  # 6 mm outside it: in the 10 mm margin
    anomaly[2, 30, 55] = 1  # 16 mm outside it
    anomaly[4, 30, 30] = 1  # the slice after the liver's last: 5 mm away along z, in the margin
    reference = _write(liver, tmp_path / "c_reference.nrrd")
    mask = _write(anomaly, tmp_path / "c_anomaly.nrrd")
    geometry = Geometry.from_image(sitk.ReadImage(str(reference)))
    case = Case("c", tmp_path / "c.nrrd", mask=mask, reference=reference)
    assert fb.anomaly_at_organ(case, geometry).tolist() == [True, True, False, False, True]
    assert not fb.anomaly_at_organ(Case("c", tmp_path / "c.nrrd", reference=reference), geometry).any()


def test_failure_causes_split_the_failures_by_anomaly():
    tables = [
        {"failed": np.array([True, False, True, False]), "anomaly_at_organ": np.array([True, True, False, False])},
        {"failed": np.array([False, True]), "anomaly_at_organ": np.array([False, False])},
    ]
    causes = fb.failure_causes(tables)
    assert causes["failed"] == 3 and causes["failed_with_anomaly_at_organ"] == 1
    assert causes["slices_with_anomaly_at_organ"] == 2
    assert causes["failed_share_of_anomaly_at_organ"] == 0.5
    assert causes["failed_share_elsewhere"] == 0.5


def test_saved_tables_come_back_for_their_model_only(tmp_path):
    tables = {
        "normal": [{"name": "a", "dice": np.array([0.9, np.nan]), "organ_score": np.array([1.0, -np.inf]),
                    "failed": np.array([False, True]), "organ_aware": True}],
        "liver mass": [{"name": "b", "dice": np.array([0.5]), "organ_score": np.array([2.0]),
                        "failed": np.array([True]), "organ_aware": False}] * 2,
    }  # fmt: skip
    path = tmp_path / "slices.npz"
    fb.save_tables(path, tmp_path / "model", tables, 12.5)
    back, seconds = fb.load_tables(path, tmp_path / "model")
    assert seconds == 12.5
    assert list(back) == ["normal", "liver mass"] and len(back["liver mass"]) == 2
    row = back["normal"][0]
    assert row["name"] == "a" and row["organ_aware"] is True
    np.testing.assert_array_equal(row["dice"], tables["normal"][0]["dice"])
    np.testing.assert_array_equal(row["organ_score"], tables["normal"][0]["organ_score"])
    assert row["failed"].dtype == bool
    assert fb.load_tables(path, tmp_path / "another") == (None, None)
    assert fb.load_tables(tmp_path / "none.npz", tmp_path / "model") == (None, None)
