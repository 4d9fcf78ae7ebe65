"""End to end on real MRML with the tiny model: score a volume node, publish, bad inputs leave the scene
unchanged, background runner events, folder scoring like the CLI, and scene save/reload round trips."""

import json
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.errors import BundleError, CancelledError, InputError
from mrml_support import (
    ORIGIN,
    anomalous_phantom,
    close_scene,
    ijk_to_ras,
    load_volume,
    node_count,
    nodes_of_class,
    rotation,
    scene_fixture,
    segmentation_from_labels,
    write_volume,
)


@pytest.fixture
def mrml_scene():
    yield from scene_fixture()


@pytest.fixture
def case(mrml_scene, tmp_path):
    phantom = anomalous_phantom(seed=11)
    path = tmp_path / "lesion.nrrd"
    write_volume(path, phantom.image, spacing=phantom.spacing, origin=ORIGIN, direction=rotation(0.04, 0.06, -0.25))
    volume = load_volume(mrml_scene, path, "lesion")
    organs = segmentation_from_labels(mrml_scene, (phantom.organs >= 2).astype(np.uint8), volume, names=["organs"])
    return {"phantom": phantom, "volume": volume, "segmentation": organs, "path": path}


def _table_column(table_node, name):
    array = table_node.GetTable().GetColumnByName(name)
    values = [array.GetVariantValue(i) for i in range(array.GetNumberOfTuples())]
    if name == "score_kind":
        return np.array([v.ToString() for v in values])
    return np.array([v.ToDouble() for v in values])


def _heatmap_array(node):
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode

    return arrayAndGeometryFromVolumeNode(node)[0] if node.GetImageData().GetPointData().GetScalars() else None


def test_score_volume_node_publishes_heatmap_table_and_chart(mrml_scene, case, tiny_model):
    from AnomalyFlagMRML.heatmap import COLOR_NODE_NAME
    from AnomalyFlagMRML.scoreTable import flaggedSlicesFromTable
    from AnomalyFlagMRML.workflow import publishResult, scoreVolumeNode

    volume, phantom = case["volume"], case["phantom"]
    calls = []
    out = scoreVolumeNode(volume, tiny_model, segmentationNode=case["segmentation"], device="cpu", batchSize=8,
                          progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    result, heat, table, chart = out["result"], out["heatmap"], out["table"], out["chart"]
    assert calls and calls[-1] == (phantom.image.shape[0], phantom.image.shape[0])
    np.testing.assert_array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_array_equal(_heatmap_array(heat), result.heatmap)
    assert result.roi is not None  # the segmentation restricted scoring
    assert table.GetNumberOfRows() == phantom.image.shape[0]
    np.testing.assert_allclose(_table_column(table, "normalised"), result.slices["normalised"])
    assert flaggedSlicesFromTable(table) == result.flagged_indices
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    assert heat.GetDisplayNode().GetColorNode().GetName() == COLOR_NODE_NAME
    assert case["segmentation"].GetDisplayNode().GetVisibility2DOutline()
    assert not case["segmentation"].GetDisplayNode().GetVisibility2DFill()
    for composite in nodes_of_class(mrml_scene, "vtkMRMLSliceCompositeNode"):
        assert composite.GetForegroundVolumeID() == heat.GetID()

    # a user threshold below every score flags every slice in the ROI, reusing the same nodes
    count = node_count(mrml_scene)
    low = float(np.nanmin(result.slices["normalised"])) - 1.0
    again = publishResult(result, volume, case["segmentation"], thresholdOverride=low, heatmapNode=heat,
                          tableNode=table, chartNode=chart)  # fmt: skip
    assert node_count(mrml_scene) == count
    assert flaggedSlicesFromTable(table) == [int(i) for i in np.flatnonzero(result.slices["in_roi"])]
    assert float(again["table"].GetAttribute("AnomalyFlag.Threshold")) == low


def test_bad_inputs_leave_the_scene_unchanged(mrml_scene, case, tiny_model, tmp_path):
    import vtk
    from AnomalyFlagMRML.workflow import scoreVolumeNode
    from vtk.util import numpy_support

    volume = case["volume"]
    flat_path = tmp_path / "flat.nrrd"
    write_volume(flat_path, case["phantom"].image[:1])
    flat = load_volume(mrml_scene, flat_path, "flat")
    vector = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ones((512, 3), np.uint8), deep=True))
    vector.SetAndObserveImageData(image)
    far = write_volume(tmp_path / "far.nrrd", (case["phantom"].organs == 2).astype(np.uint8),
                       spacing=case["phantom"].spacing, origin=np.asarray(ORIGIN) + [0.0, 0.0, 500.0])  # fmt: skip
    del far
    far_node = load_volume(mrml_scene, tmp_path / "far.nrrd", "far", labelmap=True)
    elsewhere = segmentation_from_labels(mrml_scene, (case["phantom"].organs == 2).astype(np.uint8), far_node,
                                         names=["liver"])  # fmt: skip
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    weights = sorted(damaged.glob("*.safetensors"))
    assert weights
    weights[0].write_bytes(weights[0].read_bytes()[:-64] + b"\0" * 64)

    cases = [
        (dict(inputVolumeNode=None, modelPath=tiny_model), InputError, "No input volume"),
        (dict(inputVolumeNode=flat, modelPath=tiny_model), InputError, "2D"),
        (dict(inputVolumeNode=vector, modelPath=tiny_model), InputError, "3 components"),
        (dict(inputVolumeNode=volume, modelPath=tiny_model, segmentationNode=elsewhere), InputError, "'liver'"),
        (dict(inputVolumeNode=volume, modelPath=tmp_path / "missing"), BundleError, "does not exist"),
        (dict(inputVolumeNode=volume, modelPath=damaged), BundleError, "weights|checksum|damaged"),
        (dict(inputVolumeNode=volume, modelPath=tiny_model, cancel=lambda: True), CancelledError, "cancelled"),
    ]
    before = node_count(mrml_scene)
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            scoreVolumeNode(device="cpu", **kwargs)
        assert node_count(mrml_scene) == before, kwargs


def test_publish_failure_removes_the_nodes_it_made(mrml_scene, case, tiny_model, monkeypatch):
    from AnomalyFlagMRML import workflow
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode

    array, geometry = arrayAndGeometryFromVolumeNode(case["volume"])
    result = workflow.computeScores(array, geometry, tiny_model, device="cpu", name="lesion")

    def broken(*args, **kwargs):
        raise RuntimeError("chart failed")

    monkeypatch.setattr(workflow, "createScoreChart", broken)
    before = node_count(mrml_scene)
    with pytest.raises(RuntimeError, match="chart failed"):
        workflow.publishResult(result, case["volume"])
    assert node_count(mrml_scene) == before
    assert not nodes_of_class(mrml_scene, "vtkMRMLTableNode")


def _wait(runner, timeout=60.0):
    events, deadline = [], time.time() + timeout
    while time.time() < deadline:
        events += runner.poll()
        if not runner.isRunning():
            return events + runner.poll()
        time.sleep(0.01)
    raise AssertionError("background run did not finish")


def test_thread_runner_reports_progress_result_cancel_and_errors(case, tiny_model):
    from AnomalyFlagMRML.runner import ThreadRunner
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode
    from AnomalyFlagMRML.workflow import computeScores

    array, geometry = arrayAndGeometryFromVolumeNode(case["volume"])

    def work(progress, log, cancelRequested, array, geometry):
        log("scoring")
        return computeScores(array, geometry, tiny_model, device="cpu", batchSize=4, progress=progress,
                             cancel=cancelRequested)  # fmt: skip

    runner = ThreadRunner()
    runner.start(work, array=array, geometry=geometry)
    events = _wait(runner)
    kinds = [e[0] for e in events]
    assert kinds[0] == "log" and kinds[-1] == "done" and kinds.count("done") == 1
    progress = [e[1:] for e in events if e[0] == "progress"]
    assert progress[-1] == (array.shape[0], array.shape[0]) and len(progress) == -(-array.shape[0] // 4)
    assert len(events[-1][1].slices) == array.shape[0]

    def waits_for_cancel(progress, log, cancelRequested):
        while not cancelRequested():
            time.sleep(0.005)
        raise CancelledError("stopped")

    runner.start(waits_for_cancel)
    assert runner.isRunning()
    with pytest.raises(RuntimeError, match="already"):
        runner.start(waits_for_cancel)
    runner.cancel()
    assert [e[0] for e in _wait(runner)] == ["cancelled"]

    def fails(progress, log, cancelRequested):
        raise ValueError("broken input")

    runner.start(fails)
    events = _wait(runner)
    assert [e[0] for e in events] == ["error"]
    assert isinstance(events[0][1], ValueError) and "broken input" in events[0][2] and "Traceback" in events[0][2]


def _reload(path, folder=False):

    from mrml_support import make_scene

    scene, logics = make_scene()
    if folder:
        scene.SetURL(str(path))
        assert scene.Import()
    else:
        assert scene.ReadFromMRB(str(path))
    return scene, logics


def _only(scene, class_name, role):
    nodes = [n for n in nodes_of_class(scene, class_name) if n.GetAttribute("AnomalyFlag.Role") == role]
    assert len(nodes) == 1, [n.GetName() for n in nodes]
    return nodes[0]


@pytest.mark.parametrize("how", ["mrb", "folder"])
def test_scene_save_and_reload_keeps_everything(mrml_scene, case, tiny_model, tmp_path, how):
    from AnomalyFlagMRML.heatmap import COLOR_NODE_NAME
    from AnomalyFlagMRML.scoreTable import flaggedSlicesFromTable
    from AnomalyFlagMRML.workflow import scoreVolumeNode

    out = scoreVolumeNode(case["volume"], tiny_model, segmentationNode=case["segmentation"], device="cpu")
    result = out["result"]
    if how == "mrb":
        path = tmp_path / "scene.mrb"
        assert mrml_scene.WriteToMRB(str(path))
    else:
        folder = tmp_path / "scene"
        folder.mkdir()
        assert mrml_scene.SaveSceneToSlicerDataBundleDirectory(str(folder))
        path = next(folder.glob("*.mrml"))
        written = [p.name for p in folder.rglob("*") if p.is_file()]
        assert any(n.endswith(".nrrd") for n in written) and any(n.endswith((".tsv", ".csv")) for n in written)
    scene, logics = _reload(path, folder=(how == "folder"))
    try:
        heat = _only(scene, "vtkMRMLScalarVolumeNode", "heatmap")
        volume = heat.GetNodeReference("AnomalyFlag.InputVolume")
        assert volume is not None and volume.GetName() == "lesion"
        np.testing.assert_allclose(ijk_to_ras(heat), ijk_to_ras(out["heatmap"]), atol=1e-9)
        np.testing.assert_allclose(ijk_to_ras(heat), ijk_to_ras(volume), atol=1e-9)
        np.testing.assert_array_equal(_heatmap_array(heat), result.heatmap)
        for key in ("HeatmapScale", "HeatmapUnits", "Model", "ModelFingerprint", "Threshold", "Case"):
            assert heat.GetAttribute(f"AnomalyFlag.{key}") == out["heatmap"].GetAttribute(f"AnomalyFlag.{key}")
        display = heat.GetDisplayNode()
        assert display.GetColorNode() is not None and display.GetColorNode().GetName() == COLOR_NODE_NAME
        assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(50.0)
        lut, original = display.GetColorNode().GetLookupTable(), out["heatmap"].GetDisplayNode().GetColorNode()
        for i in (0, 64, 128, 255):
            np.testing.assert_allclose(lut.GetTableValue(i), original.GetLookupTable().GetTableValue(i), atol=1e-3)

        table = heat.GetNodeReference("AnomalyFlag.ScoreTable")
        assert table is not None and table.GetNumberOfRows() == len(result.slices)
        assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == result.slices.names
        for name in result.slices.names:
            if name == "score_kind":
                assert _table_column(table, name).tolist() == result.slices[name].tolist()
                continue
            np.testing.assert_allclose(_table_column(table, name), result.slices[name].astype(float), rtol=1e-5,
                                       equal_nan=True)  # fmt: skip
        assert flaggedSlicesFromTable(table) == result.flagged_indices
        assert table.GetAttribute("AnomalyFlag.Threshold") == out["table"].GetAttribute("AnomalyFlag.Threshold")

        chart = heat.GetNodeReference("AnomalyFlag.Chart")
        assert chart is not None and chart.GetNumberOfPlotSeriesNodes() == 3
        roles = {chart.GetNthPlotSeriesNode(i).GetAttribute("AnomalyFlag.Series"): chart.GetNthPlotSeriesNode(i)
                 for i in range(3)}  # fmt: skip
        assert set(roles) == {"score", "threshold", "flagged"}
        assert roles["score"].GetTableNode() is table
        data = roles["flagged"].GetTableNode()
        flagged_y = _table_column(data, "flagged_score")
        assert sorted(int(i) for i in _table_column(data, "index")[~np.isnan(flagged_y)]) == result.flagged_indices
        segmentation = heat.GetNodeReference("AnomalyFlag.Segmentation")
        assert segmentation is not None and segmentation.GetDisplayNode().GetVisibility2DOutline()
        assert not segmentation.GetDisplayNode().GetVisibility2DFill()
    finally:
        close_scene(scene, logics)


@pytest.mark.slow
def test_score_folder_writes_the_cli_files_and_snapshots(mrml_scene, phantom_anomalous_dir, flagging_model, tmp_path):
    from AnomalyFlagLib.cli import main
    from AnomalyFlagMRML.workflow import scoreFolder

    cli_out, out = tmp_path / "cli", tmp_path / "mrml"
    assert main(["score", "--model", str(flagging_model), "--input", str(phantom_anomalous_dir),
                 "--output", str(cli_out), "--roi", str(phantom_anomalous_dir), "--device", "cpu"]) == 0  # fmt: skip
    before = node_count(mrml_scene)
    ticks = []
    summaries = scoreFolder(flagging_model, phantom_anomalous_dir, out, device="cpu", roiFolder=phantom_anomalous_dir,
                            progress=lambda d, t: ticks.append((d, t)), snapshotSize=192)  # fmt: skip
    assert node_count(mrml_scene) == before  # cases were loaded only temporarily
    assert ticks[-1][0] == ticks[-1][1] and all(a[0] <= b[0] for a, b in zip(ticks, ticks[1:]))
    cli_files = sorted(p.name for p in cli_out.iterdir())
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == cli_files
    expected_pngs = []
    for summary in summaries:
        assert "error" not in summary, summary
        name = summary["case"]
        assert (out / f"{name}_slices.csv").read_text() == (cli_out / f"{name}_slices.csv").read_text()
        ours = json.loads((out / f"{name}_summary.json").read_text())
        theirs = json.loads((cli_out / f"{name}_summary.json").read_text())
        assert set(ours) == set(theirs)
        assert ours.get("image") == theirs.get("image") == summary.get("image")
        assert ours["flagged_slices"] == theirs["flagged_slices"] == summary["flagged_slices"]
        ours_heat = sitk.ReadImage(str(out / f"{name}_heatmap.nrrd"))
        theirs_heat = sitk.ReadImage(str(cli_out / f"{name}_heatmap.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours_heat), sitk.GetArrayFromImage(theirs_heat))
        assert ours_heat.GetMetaData("anomalyflag_scale") == theirs_heat.GetMetaData("anomalyflag_scale")
        expected_pngs += [f"{name}_slice{k}.png" for k in summary["flagged_slices"]]
        assert summary["snapshots"] == [f"{name}_slice{k}.png" for k in summary["flagged_slices"]]
    assert pngs == sorted(expected_pngs) and pngs, "no flagged slice in the anomalous phantoms"
    png = sitk.ReadImage(str(out / pngs[0]))
    assert png.GetSize() == (192, 192) and png.GetNumberOfComponentsPerPixel() == 3


@pytest.mark.slow
def test_score_folder_reports_a_scan_unlike_the_training_data(mrml_scene, phantom_normal_dir, tiny_model, tmp_path):
    from AnomalyFlagMRML.workflow import scoreFolder

    scans = tmp_path / "scans"
    scans.mkdir()
    image = sitk.ReadImage(str(phantom_normal_dir / "normal_000.nrrd"))
    mr_like = sitk.Cast(image, sitk.sitkFloat32) + 1024.0  # no air near -1000 HU, as on MR
    sitk.WriteImage(mr_like, str(scans / "mr_like.nrrd"))
    shutil.copy(phantom_normal_dir / "normal_000.nrrd", scans)
    lines = []
    summaries = {s["case"]: s for s in scoreFolder(tiny_model, scans, tmp_path / "out", device="cpu",
                                                    snapshots=False, log=lines.append)}  # fmt: skip
    assert summaries["mr_like"]["out_of_distribution"] and not summaries["normal_000"]["out_of_distribution"]
    assert [line for line in lines if "WARNING" in line] == [f"mr_like: WARNING: {summaries['mr_like']['warnings'][0]}"]
