"""scripts/reference_segmenter.py: the reference U-Net trains on phantoms' liver labels, predicts on the input's
exact grid with a per-slice uncertainty table, reproducibly, and refuses damaged models and unusable data."""

import csv
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import reference_segmenter as rs  # noqa: E402
from AnomalyFlagLib.errors import InputError  # noqa: E402
from AnomalyFlagLib.phantom import ORGAN_LABELS, make_phantom_set  # noqa: E402

SLICES = 12


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("segmenter_normals")
    make_phantom_set(folder, num_cases=3, anomalous=False, seed=0, num_slices=SLICES, size=64)
    return folder


@pytest.fixture(scope="module")
def model(normals, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segmenter_model") / "model"
    assert rs.main(["train", "--input", str(normals), "--output", str(out), "--iterations", "30"]) == 0
    return out


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == rs.UNCERTAINTY_COLUMNS
        return list(reader)


@pytest.mark.slow
def test_model_folder_holds_only_safetensors_and_json(model):
    assert sorted(p.name for p in model.iterdir()) == ["model.json", "model.safetensors"]
    _network, meta = rs.load_model(model)
    assert meta["training"]["steps"] == 30 and meta["training"]["validation_case"] == "normal_002"
    assert 0.0 <= meta["training"]["validation_dice"] <= 1.0
    assert meta["label"] == {"name": "liver", "value": ORGAN_LABELS["liver"], "output_value": 1}
    assert meta["input"]["window_hu"] == [-200.0, 300.0]


@pytest.mark.slow
def test_predict_keeps_the_input_grid_writes_one_row_per_slice_and_is_deterministic(model, normals, tmp_path):
    assert rs.main(["predict", "--model", str(model), "--input", str(normals), "--output", str(tmp_path / "a")]) == 0
    assert rs.main(["predict", "--model", str(model), "--input", str(normals), "--output", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    cases = [f"normal_{i:03d}" for i in range(3)]
    assert names == sorted([f"{c}_seg.nrrd" for c in cases] + [f"{c}_uncertainty.csv" for c in cases])
    predicted_slices = 0
    for case in cases:
        image = sitk.ReadImage(str(normals / f"{case}.nrrd"))
        seg = sitk.ReadImage(str(tmp_path / "a" / f"{case}_seg.nrrd"))
        assert _geometry(seg) == _geometry(image)
        assert seg.GetPixelID() == sitk.sitkUInt8
        labels = sitk.GetArrayFromImage(seg)
        assert set(np.unique(labels)) <= {0, 1}
        again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / f"{case}_seg.nrrd")))
        assert np.array_equal(labels, again)
        table = (tmp_path / "a" / f"{case}_uncertainty.csv").read_text()
        assert table == (tmp_path / "b" / f"{case}_uncertainty.csv").read_text()
        rows = _rows(tmp_path / "a" / f"{case}_uncertainty.csv")
        assert [int(r["index"]) for r in rows] == list(range(SLICES))
        for k, row in enumerate(rows):  # identity direction: the axial index is the array's first axis
            values = [float(row[c]) for c in rs.UNCERTAINTY_COLUMNS[1:]]
            if labels[k].any():
                predicted_slices += 1
                assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
            else:
                assert all(math.isnan(v) for v in values)
    assert predicted_slices > 0
    every = tmp_path / "every"
    assert (
        rs.main(["predict", "--model", str(model), "--input", str(normals), "--output", str(every), "--all-components"])
        == 0
    )
    for case in cases:  # the default contour is one piece of the raw one
        kept = sitk.ReadImage(str(tmp_path / "a" / f"{case}_seg.nrrd"))
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(every / f"{case}_seg.nrrd")))
        assert np.all(raw >= sitk.GetArrayFromImage(kept))
        assert sitk.GetArrayFromImage(sitk.ConnectedComponent(kept)).max() == 1


@pytest.mark.slow
def test_a_volume_stored_in_another_voxel_order_gets_the_same_segmentation(model, normals, tmp_path):
    """Columns stored right-to-left (direction's x axis negated): the network sees the same axial slices, so
    the label map is the same in patient space and the table is identical."""
    image = sitk.ReadImage(str(normals / "normal_000.nrrd"))
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0)))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(flipped, str(tmp_path / "in" / "normal_000.nrrd"))
    rs.predict(model, tmp_path / "in" / "normal_000.nrrd", tmp_path / "flipped", log=lambda s: None)
    rs.predict(model, normals / "normal_000.nrrd", tmp_path / "plain", log=lambda s: None)
    seg = sitk.ReadImage(str(tmp_path / "flipped" / "normal_000_seg.nrrd"))
    assert _geometry(seg) == _geometry(flipped)
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "normal_000_seg.nrrd")))
    assert np.array_equal(sitk.GetArrayFromImage(seg)[:, :, ::-1], plain)
    table = (tmp_path / "flipped" / "normal_000_uncertainty.csv").read_text()
    assert table == (tmp_path / "plain" / "normal_000_uncertainty.csv").read_text()


@pytest.mark.slow
def test_evaluate_measures_dice_against_the_organ_labels(model, normals, tmp_path):
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for i in range(3):
        organs = sitk.ReadImage(str(normals / f"normal_{i:03d}_organs.nrrd"))
        liver = sitk.Cast(organs == ORGAN_LABELS["liver"], sitk.sitkUInt8)
        sitk.WriteImage(liver, str(perfect / f"normal_{i:03d}_seg.nrrd"))
    report = rs.evaluate(normals, perfect, log=lambda s: None)
    assert report["summary"]["mean_volume_dice"] == 1.0 and report["summary"]["failure_rate_all"] == 0.0
    assert report["summary"]["scored_slices_anomaly"] == 0  # normal phantoms: empty anomaly masks
    assert report["summary"]["anomaly_in_organ_recall"] is None
    lesion = tmp_path / "lesion"
    lesion.mkdir()
    shutil.copy(normals / "normal_000.nrrd", lesion)
    shutil.copy(normals / "normal_000_organs.nrrd", lesion)
    organs = sitk.ReadImage(str(normals / "normal_000_organs.nrrd"))
    liver = sitk.GetArrayFromImage(organs) == ORGAN_LABELS["liver"]
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    anomaly = np.zeros_like(liver)
    anomaly[k] = liver[k]
    anomaly[k, :, liver.shape[2] // 2 :] = False
    seg = liver & ~anomaly
    for array, name in ((anomaly, "lesion/normal_000_anomaly.nrrd"), (seg, "lesion/normal_000_seg.nrrd")):
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.CopyInformation(organs)
        sitk.WriteImage(image, str(tmp_path / name))
    report = rs.evaluate(lesion, lesion, log=lambda s: None)
    assert report["summary"]["anomaly_voxels_in_organ"] == int(anomaly.sum()) > 0
    assert report["summary"]["anomaly_in_organ_recall"] == 0.0
    assert report["summary"]["scored_slices_anomaly_in_organ"] == 1
    assert report["cases"]["normal_000"]["slice_dice"][k] == pytest.approx(rs.dice(seg[k], liver[k]), abs=1e-4)
    rs.predict(model, normals, tmp_path / "pred", log=lambda s: None)
    out = tmp_path / "dice.json"
    args = ["--input", str(normals), "--segmentations", str(tmp_path / "pred"), "--output", str(out)]
    assert rs.main(["evaluate"] + args) == 0
    assert out.is_file()
    with pytest.raises(InputError, match="no segmentation normal_000_seg"):
        rs.evaluate(normals, tmp_path, log=lambda s: None)


def test_boundary_band_is_the_pixels_within_5_mm_of_the_contour():
    mask = np.zeros((2, 40, 40), dtype=bool)
    mask[0, 10:30, 10:30] = True
    band = rs.boundary_band(mask, 1.0, 1.0, 5.0)
    assert not band[1].any()
    assert band[0, 20, 5] and band[0, 20, 14] and band[0, 20, 25] and band[0, 20, 34]
    assert not band[0, 20, 4] and not band[0, 20, 15] and not band[0, 20, 24] and not band[0, 20, 35]
    probability = np.where(mask, 0.9, 0.1).astype(np.float32)
    rows = rs.uncertainty_rows(probability, mask, rs.AxialFrame((0, 1, 2), False, False, 2, 1.0, 1.0))
    expected = float(rs.binary_entropy_bits(np.float32(0.9)))
    assert rows[0][0] == 0 and rows[0][1] == pytest.approx(expected) and rows[0][3] == pytest.approx(expected)
    assert rows[1][0] == 1 and all(math.isnan(v) for v in rows[1][1:])
    assert "1,nan,nan,nan" in rs.uncertainty_csv(rows)


def test_largest_component_keeps_the_organ_and_drops_islands_in_3d():
    mask = np.zeros((4, 30, 30), dtype=bool)
    mask[0:3, 5:20, 5:20] = True  # the organ, over three slices
    mask[3, 6:8, 6:8] = True  # touches it through the slice face: part of it
    mask[1, 25:28, 25:28] = True  # an island beside it
    mask[3, 25, 25] = True  # a stray pixel on another slice
    kept = rs.largest_component(mask)
    expected = mask.copy()
    expected[1, 25:28, 25:28] = expected[3, 25, 25] = False
    np.testing.assert_array_equal(kept, expected)
    empty = np.zeros((2, 5, 5), dtype=bool)
    assert not rs.largest_component(empty).any()


@pytest.mark.slow
def test_missing_or_damaged_models_are_refused(model, normals, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert rs.main(["predict", "--model", str(missing), "--input", str(normals), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(rs.ModelError, match="checksum"):
        rs.load_model(damaged)
    (damaged / "model.json").write_text("{not json")
    with pytest.raises(rs.ModelError, match="damaged"):
        rs.load_model(damaged)
    (damaged / "model.json").unlink()
    with pytest.raises(rs.ModelError, match="no model.json"):
        rs.load_model(damaged)
    with pytest.raises(InputError, match="holds other files"):
        rs.save_model(normals, None, {})


def test_unusable_training_data_is_refused(normals, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no volumes"):
        rs.train(tmp_path / "empty", tmp_path / "m", iterations=1, log=lambda s: None)
    no_labels = tmp_path / "no_labels"
    no_labels.mkdir()
    for i in range(2):
        shutil.copy(normals / f"normal_{i:03d}.nrrd", no_labels)
    with pytest.raises(InputError, match="has no label map normal_000_organs"):
        rs.train(no_labels, tmp_path / "m", iterations=1, log=lambda s: None)
    for i in range(2):
        organs = sitk.ReadImage(str(normals / f"normal_{i:03d}_organs.nrrd"))
        sitk.WriteImage(organs * sitk.Cast(organs != ORGAN_LABELS["liver"], organs.GetPixelID()),
                        str(no_labels / f"normal_{i:03d}_organs.nrrd"))  # fmt: skip
    with pytest.raises(InputError, match="no 'liver' voxels"):
        rs.train(no_labels, tmp_path / "m", iterations=1, log=lambda s: None)
    with pytest.raises(InputError, match="neither an organ name"):
        rs.train(normals, tmp_path / "m", iterations=1, label="pancreas", log=lambda s: None)
    assert not (tmp_path / "m").exists()
