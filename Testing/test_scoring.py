"""Scoring: exact output geometry, streaming equals in-memory, orientation, ROI, bad input, cancel."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.devices import select_device
from AnomalyFlagLib.errors import CancelledError, DeviceError, InputError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.scored_case import NrrdHeatmapSink
from AnomalyFlagLib.io.slice_source import ArraySource, NrrdStreamSource, open_source
from AnomalyFlagLib.orientation import AxialFrame
from AnomalyFlagLib.results import slice_columns
from AnomalyFlagLib.scoring import Scorer


@pytest.fixture(scope="module")
def scorer(tiny_model):
    return Scorer(tiny_model, device="cpu", batch_size=7)


@pytest.fixture(scope="module")
def case_image(phantom_anomalous_dir):
    return sitk.ReadImage(str(phantom_anomalous_dir / "anomalous_000.nrrd"))


def oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels with a rotated direction matrix and an arbitrary origin."""
    out = sitk.Image(image)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    out.SetDirection(tuple(rot.ravel()))
    out.SetOrigin((12.5, -40.25, 301.0))
    return out


def test_result_has_one_row_per_slice_and_heatmap_in_input_geometry(scorer, case_image):
    image = oblique(case_image)
    result = scorer.score(image, name="case")
    assert len(result.slices) == image.GetSize()[2]
    assert result.slices.names == list(slice_columns([c.name for c in scorer.bundle.components]))
    assert set(result.summary()["columns"]) == set(result.slices.names)
    heat = result.heatmap_image()
    assert heat.GetSize() == image.GetSize()
    assert heat.GetSpacing() == image.GetSpacing()
    assert heat.GetOrigin() == image.GetOrigin()
    assert heat.GetDirection() == image.GetDirection()
    assert heat.GetPixelID() == sitk.sitkUInt8
    assert result.summary()["num_slices"] == len(result.slices)
    z = result.slices["z_mm"]
    assert np.allclose(np.diff(z), image.GetSpacing()[2], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("suffix,compress", [(".nrrd", False), (".nrrd", True), (".nii", False), (".mha", False)])
def test_streamed_file_scores_equal_in_memory_scores(scorer, case_image, tmp_path, suffix, compress):
    path = tmp_path / f"case{suffix}"
    sitk.WriteImage(case_image, str(path), useCompression=compress)
    source = open_source(path)
    assert not isinstance(source, ArraySource), "this format should stream"
    streamed = scorer.score(source)
    memory = scorer.score(case_image)
    np.testing.assert_allclose(streamed.slices["normalised"], memory.slices["normalised"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(streamed.heatmap, memory.heatmap)


def test_nrrd_stream_reads_only_one_batch_at_a_time(scorer, case_image, tmp_path):
    path = tmp_path / "case.nrrd"
    sitk.WriteImage(case_image, str(path), useCompression=True)
    source = open_source(path)
    assert isinstance(source, NrrdStreamSource)
    sizes = []
    original = source._read

    def spy(k0, k1):
        sizes.append(k1 - k0)
        return original(k0, k1)

    source._read = spy
    scorer.score(source)
    assert max(sizes) <= scorer.batch_size
    assert sum(sizes) == case_image.GetSize()[2]


def test_heatmap_written_by_stream_sink_matches_memory(scorer, case_image, tmp_path):
    image = oblique(case_image)
    path = tmp_path / "heat.nrrd"
    geometry = Geometry.from_image(image)
    result = scorer.score(image, heatmap_sink=NrrdHeatmapSink(path, geometry, {"anomalyflag_scale": "0.02"}))
    assert result.heatmap is None
    written = sitk.ReadImage(str(path))
    assert Geometry.from_image(written).matches(geometry)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), scorer.score(image).heatmap)
    assert written.GetMetaData("anomalyflag_scale") == "0.02"


def test_flipped_storage_order_gives_the_same_scores(scorer, case_image):
    """A volume stored with reversed columns and rows (negative direction) is the same anatomy."""
    array = sitk.GetArrayFromImage(case_image)
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1, ::-1]))
    flipped.SetSpacing(case_image.GetSpacing())
    size = np.array(case_image.GetSize())
    sp = np.array(case_image.GetSpacing())
    origin = np.array(case_image.GetOrigin()) + np.array([(size[0] - 1) * sp[0], (size[1] - 1) * sp[1], 0])
    flipped.SetOrigin(tuple(origin))
    flipped.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    a, b = scorer.score(case_image), scorer.score(flipped)
    np.testing.assert_allclose(a.slices["normalised"], b.slices["normalised"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(a.heatmap, b.heatmap[:, ::-1, ::-1])


def test_sagittal_storage_is_scored_along_the_axial_axis(scorer, case_image):
    """Voxel axes permuted (k is left-right): slices are still taken along superior-inferior."""
    array = sitk.GetArrayFromImage(case_image)  # (z, y, x)
    permuted = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # numpy (x, y, z): i=z, j=y, k=x
    image = sitk.GetImageFromArray(permuted)
    sp = case_image.GetSpacing()
    image.SetSpacing((sp[2], sp[1], sp[0]))
    image.SetOrigin(case_image.GetOrigin())
    image.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    assert AxialFrame.from_geometry(Geometry.from_image(image)).slice_ijk_axis == 0
    a, b = scorer.score(case_image), scorer.score(image)
    np.testing.assert_allclose(a.slices["normalised"], b.slices["normalised"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(a.heatmap, np.transpose(b.heatmap, (2, 1, 0)))


def test_scores_do_not_depend_on_other_cases_or_batch_size(tiny_model, case_image):
    a = Scorer(tiny_model, device="cpu", batch_size=3).score(case_image)
    b = Scorer(tiny_model, device="cpu", batch_size=24).score(case_image)
    np.testing.assert_allclose(a.slices["score"], b.slices["score"], rtol=1e-4, atol=1e-6)


def test_a_scan_scoring_high_throughout_is_flagged_where_it_stands_out(tiny_model, case_image):
    def scorer(relative):  # a model that this scan looks unusual to on every slice (3 MADs higher)
        scorer = Scorer(tiny_model, device="cpu")
        cal = scorer.bundle.calibration
        cal.medians = [m - 3.0 * s for m, s in zip(cal.medians, cal.scales)]
        scorer.bundle.scoring.relative_to_scan = relative
        return scorer

    relative, absolute = scorer(True).score(case_image), scorer(False).score(case_image)
    level = float(np.median(absolute.slices["normalised"]))
    assert level > relative.threshold  # more than half the slices would be flagged
    assert relative.scan_level == pytest.approx(level) and absolute.scan_level == 0.0
    np.testing.assert_allclose(relative.slices["normalised"], absolute.slices["normalised"] - level)
    assert len(relative.flagged_indices) <= len(relative.slices) // 2 < len(absolute.flagged_indices)
    assert set(relative.flagged_indices) <= set(absolute.flagged_indices)
    assert relative.warnings == absolute.warnings  # the scan is still reported as unlike the training data
    assert relative.summary()["scan_level"] == pytest.approx(level)
    assert f"which scores {level:.2f} above normal scans" in relative.level_text() and absolute.level_text() == ""


def test_roi_restricts_flags_and_heatmap(scorer, case_image):
    array = sitk.GetArrayFromImage(case_image)
    roi = np.zeros(array.shape, dtype=np.uint8)
    roi[10:13, 20:40, 20:40] = 1
    result = scorer.score(case_image, roi=roi, roi_margin_mm=0.0).with_threshold(-1e9)
    assert set(result.flagged_indices) == {10, 11, 12}
    assert not result.heatmap[:10].any() and not result.heatmap[13:].any()
    assert not result.heatmap[10:13, :20].any() and not result.heatmap[10:13, 40:].any()
    assert np.isnan(result.slices["anomaly_fraction"][0])
    with_margin = scorer.score(case_image, roi=roi, roi_margin_mm=case_image.GetSpacing()[2])
    assert with_margin.slices["in_roi"].sum() == 5


def test_cropped_segmentation_is_placed_on_the_image_grid(scorer, case_image, tmp_path):
    array = np.zeros(sitk.GetArrayFromImage(case_image).shape, dtype=np.uint8)
    array[8:12, 30:34, 25:29] = 3
    full = sitk.GetImageFromArray(array)
    full.CopyInformation(case_image)
    cropped = full[20:40, 25:40, 5:15]  # i, j, k ranges
    sitk.WriteImage(cropped, str(tmp_path / "seg.nrrd"))
    result = scorer.score(case_image, roi=tmp_path / "seg.nrrd", roi_labels=[3], roi_margin_mm=0.0)
    assert np.flatnonzero(result.slices["in_roi"]).tolist() == [8, 9, 10, 11]


def test_roi_on_another_grid_is_refused(scorer, case_image):
    other = sitk.Image(case_image.GetSize(), sitk.sitkUInt8)
    other.SetSpacing((0.5, 0.5, 0.5))
    other[3, 3, 3] = 1
    with pytest.raises(InputError, match="does not match the geometry"):
        scorer.score(case_image, roi=other)


def test_bad_volumes_are_refused_with_the_reason(scorer, tmp_path):
    good = np.random.default_rng(0).normal(size=(6, 32, 32)).astype(np.float32)
    with pytest.raises(InputError, match="2 dimensions"):
        scorer.score(good[0])
    with pytest.raises(InputError, match="4 dimensions"):
        scorer.score(good[None])
    nan = good.copy()
    nan[2, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        scorer.score(nan)
    with pytest.raises(InputError, match="constant"):
        scorer.score(np.full((6, 32, 32), -1000, dtype=np.int16))
    with pytest.raises(InputError, match="empty"):
        scorer.score(np.zeros((0, 32, 32), dtype=np.int16))
    garbage = tmp_path / "broken.nrrd"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="broken.nrrd"):
        scorer.score(garbage)
    image2d = sitk.Image(32, 32, sitk.sitkInt16)
    sitk.WriteImage(image2d, str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2 dimensions"):
        scorer.score(tmp_path / "flat.nrrd")


def test_nan_in_a_streamed_file_aborts_without_a_heatmap_file(scorer, tmp_path):
    array = np.random.default_rng(1).normal(size=(20, 32, 32)).astype(np.float32) * 100
    array[15, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    source = open_source(tmp_path / "nan.nrrd")
    out = tmp_path / "heat.nrrd"
    with pytest.raises(InputError, match="NaN"):
        scorer.score(source, heatmap_sink=NrrdHeatmapSink(out, source.geometry, {}))
    assert list(tmp_path.iterdir()) == [tmp_path / "nan.nrrd"]


def test_truncated_gzip_nrrd_is_an_input_error(scorer, case_image, tmp_path):
    path = tmp_path / "cut.nrrd"
    sitk.WriteImage(case_image, str(path), useCompression=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="cut.nrrd"):
        scorer.score(path)


def test_progress_and_cancel(scorer, case_image, tmp_path):
    calls = []
    scorer.score(case_image, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (24, 24) and len(calls) == 4
    out = tmp_path / "heat.nrrd"
    sink = NrrdHeatmapSink(out, Geometry.from_image(case_image), {})
    with pytest.raises(CancelledError):
        scorer.score(
            case_image, heatmap_sink=sink, cancel=lambda: len(calls) > 4, progress=lambda d, t: calls.append(d)
        )
    assert not any(tmp_path.iterdir()), "a cancelled run leaves no file"


def test_cuda_requested_without_gpu_is_an_error(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        Scorer(tiny_model, device="cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        Scorer(tiny_model, device="tpu")
    for typo in ("cudafoo", "cuda:", "cuda:x"):
        with pytest.raises(DeviceError, match=f"unknown device '{typo}'"):
            select_device(typo)
    assert Scorer(tiny_model, device="auto").device.type in ("cpu", "mps")


def test_mixed_precision_follows_the_hardware_and_can_be_turned_off(monkeypatch):
    import torch
    from AnomalyFlagLib import devices

    cpu = torch.device("cpu")
    monkeypatch.delenv(devices.PRECISION_VARIABLE, raising=False)
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    assert devices.mixed_precision_dtype(cpu) == torch.bfloat16 and devices.precision_name(cpu) == "bfloat16"
    with devices.autocast_for(cpu):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)  # emulated bfloat16 is slower
    assert devices.mixed_precision_dtype(cpu) is None
    with devices.autocast_for(cpu):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setenv(devices.PRECISION_VARIABLE, "float32")
    assert devices.mixed_precision_dtype(cpu) is None and devices.precision_name(cpu, training=True) == "float32"
    monkeypatch.setenv(devices.PRECISION_VARIABLE, "half")
    with pytest.raises(DeviceError, match="ANOMALYFLAG_PRECISION='half' is not a precision; choose auto or float32"):
        devices.autocast_for(cpu)


def test_a_bundle_records_the_precision_it_was_trained_and_calibrated_in(tiny_model):
    import json

    import torch
    from AnomalyFlagLib.devices import precision_name

    recorded = json.loads((tiny_model / "metadata.json").read_text())["training"]["precision"]
    cpu = torch.device("cpu")
    assert recorded == {"training": precision_name(cpu, training=True), "calibration": precision_name(cpu)}
