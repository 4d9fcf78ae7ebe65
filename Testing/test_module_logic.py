"""The module's Logic and its scoring controller on real MRML (slicer-core), AnomalyFlag.py loaded with
stand-ins for Slicer's Qt side: the console path (scoreVolume), the panel's path (prepare on the main thread,
score in the background runner, publish when the controller sees the run end) with the real ThreadRunner and
with a fake runner from the Logic's runner factory, every way a run can end, and the texts the panel shows
about its inputs and results."""

import traceback

import numpy as np
import pytest
from AnomalyFlagLib.errors import BundleError, CancelledError, InputError
from module_support import module_on_mrml, mrml_scene  # noqa: F401 - fixtures


class FakeRunner:
    """A BackgroundRunner that runs the job when released (at once unless `hold`), on the calling thread, and
    queues the events ThreadRunner would."""

    hold = False

    def __init__(self):
        self.events, self.cancelled, self.job = [], False, None

    def start(self, fn, **kwargs):
        self.job = (fn, kwargs)
        if not self.hold:
            self.release()

    def release(self):
        fn, kwargs = self.job
        self.job = None
        try:
            result = fn(progress=lambda done, total: self.events.append(("progress", done, total)),
                        log=lambda text: self.events.append(("log", text)),
                        cancelRequested=lambda: self.cancelled, **kwargs)  # fmt: skip
        except CancelledError:
            self.events.append(("cancelled",))
        except Exception as exc:
            self.events.append(("error", exc, traceback.format_exc()))
        else:
            self.events.append(("done", result))

    def poll(self):
        events, self.events = self.events, []
        return events

    def cancel(self):
        self.cancelled = True

    def isRunning(self):
        return self.job is not None


class HeldRunner(FakeRunner):
    hold = True


def _poll_to_the_end(controller, timeout=120):
    import time

    events, deadline = [], time.time() + timeout
    while controller.isRunning() and time.time() < deadline:
        events += controller.poll()
        time.sleep(0.01)
    return events


def _volume_and_result(scene, flagged=(4, 9)):
    """A volume node and a synthetic CaseResult on its grid (slices `flagged` over the threshold)."""
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray
    from mrml_support import synthetic_result

    geometry = Geometry((24, 20, 12), (1.0, 1.2, 2.5), (-5.0, 3.0, 10.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    updateVolumeNodeFromArray(volume, np.zeros((12, 20, 24), np.int16), geometry)
    normalised = np.zeros(12)
    normalised[list(flagged)] = 5.0
    heat = np.zeros((12, 20, 24), np.uint8)
    heat[list(flagged), 5:9, 5:9] = 120
    return volume, synthetic_result(geometry, heat, normalised=normalised, name="ct")


def _task_returning(result):
    def task(progress, log, cancelRequested, **job):
        log("scoring")
        for k in range(1, 4):
            if cancelRequested():
                raise CancelledError("cancelled")
            progress(k, 3)
        return result

    return task


def test_scoring_controller_publishes_the_result_of_a_run(mrml_scene):  # noqa: F811
    from AnomalyFlagMRML.scoringController import ScoringController

    volume, result = _volume_and_result(mrml_scene)
    controller = ScoringController(FakeRunner)
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "reused table")
    controller.start(_task_returning(result), {}, volume, thresholdOverride=2.0, tableNode=table)
    events = controller.poll()
    assert [e[0] for e in events] == ["log", "progress", "progress", "progress", "done"]
    assert events[1:4] == [("progress", 1, 3), ("progress", 2, 3), ("progress", 3, 3)]
    outputs = events[-1][1]
    assert outputs["table"] is table and outputs["result"].threshold == 2.0
    assert outputs["result"].flagged_indices == [4, 9]
    assert outputs["heatmap"].GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert not controller.isRunning() and controller.poll() == []


def test_scoring_controller_ends_every_run_once(mrml_scene):  # noqa: F811
    from AnomalyFlagMRML.scoringController import ScoringController

    volume, result = _volume_and_result(mrml_scene)
    nodes = mrml_scene.GetNumberOfNodes()

    # cancelled while running; a second run is refused meanwhile
    controller = ScoringController(HeldRunner)
    controller.start(_task_returning(result), {}, volume)
    assert controller.isRunning() and controller.poll() == []
    with pytest.raises(RuntimeError, match="already in progress"):
        controller.start(_task_returning(result), {}, volume)
    controller.cancel()
    controller.runner.release()
    assert [e[0] for e in controller.poll()] == ["log", "cancelled"] and not controller.isRunning()

    # the task fails
    def failing(**kwargs):
        raise InputError("no such slice")

    controller = ScoringController(FakeRunner)
    controller.start(failing, {}, volume)
    (kind, exc, tb), *rest = controller.poll()
    assert (kind, str(exc), rest) == ("error", "no such slice", []) and "no such slice" in tb

    # the result does not fit the volume it is published on
    other, _ = _volume_and_result(mrml_scene)
    other.SetSpacing(2.0, 2.0, 2.0)
    controller.start(_task_returning(result), {}, other)
    kind, exc, tb = controller.poll()[-1]
    assert kind == "publishError" and tb
    mrml_scene.RemoveNode(other)

    # the input volume left the scene while scoring
    gone, _ = _volume_and_result(mrml_scene)
    controller = ScoringController(HeldRunner)
    controller.start(_task_returning(result), {}, gone)
    mrml_scene.RemoveNode(gone)
    controller.runner.release()
    assert controller.poll()[-1] == ("discarded",)

    # the runner ended without a final event
    controller.start(lambda **kwargs: None, {}, volume)
    controller.runner.job = None
    (kind, exc, tb), *rest = controller.poll()
    assert kind == "error" and "without a result" in str(exc) and not controller.isRunning()

    # abandoned by the panel: cancelled and forgotten
    controller.start(_task_returning(result), {}, volume)
    controller.abandon()
    assert controller.runner.cancelled and not controller.isRunning() and controller.poll() == []
    assert mrml_scene.GetNumberOfNodes() == nodes


def test_logic_starts_the_panels_scoring_in_a_runner_from_its_factory(module_on_mrml, mrml_scene, tmp_path):  # noqa: F811
    volume, _ = _volume_and_result(mrml_scene)
    logic = module_on_mrml.AnomalyFlagLogic(runnerFactory=FakeRunner)
    job = {"array": np.zeros((12, 20, 24)), "geometry": None, "modelPath": tmp_path / "nowhere"}
    logic.startScoring(job, volume)
    assert isinstance(logic.scoring.runner, FakeRunner)
    events = logic.scoring.poll()
    assert events[0] == ("log", f"Loading model {tmp_path / 'nowhere'} on device 'auto' ...")
    assert events[-1][0] == "error" and isinstance(events[-1][1], BundleError) and not logic.scoring.isRunning()


def test_the_panel_texts_about_inputs_and_results(module_on_mrml, mrml_scene, tmp_path):  # noqa: F811
    from AnomalyFlagMRML.scoringController import resultSummary

    volume, result = _volume_and_result(mrml_scene)
    logic = module_on_mrml.AnomalyFlagLogic()
    model = tmp_path / "model"
    model.mkdir()
    problem, text = logic.checkInputs(volume, model)
    assert problem == text == f"'{model}' is not a model folder (it has no metadata.json)."
    (model / "metadata.json").write_text("{}")
    assert logic.checkInputs(volume, model) == (None, f"Model: {model}")
    assert logic.checkInputs(None, model)[0] == "Select the CT volume to score."
    assert "must not be the input volume" in logic.checkInputs(volume, model, volume)[0]
    demo = logic.defaultModelPath()
    if demo is not None:
        assert logic.checkInputs(volume, "") == (None, f"Demo model: {demo}")
    result.timings["total"] = 1.5
    assert resultSummary(result) == "Done: 2 of 12 slices flagged (1.5 s)."
    result.scan_level = 1.234
    assert "relative to this scan, which scores 1.23 above normal scans throughout." in resultSummary(result)
    result.warnings.append("body much smaller")
    assert resultSummary(result).endswith("training data: body much smaller.")


@pytest.fixture
def stent_volume(mrml_scene, tmp_path):  # noqa: F811
    from AnomalyFlagLib.phantom import make_phantom
    from mrml_support import load_volume

    phantom = make_phantom(num_slices=24, size=64, seed=5, anomalies=["metal_stent"])
    paths = phantom.save(tmp_path, "stent")
    return phantom, load_volume(mrml_scene, paths["image"], "stent")


def _composites(scene):
    from mrml_support import nodes_of_class

    return nodes_of_class(scene, "vtkMRMLSliceCompositeNode")


@pytest.mark.slow
def test_logic_scores_a_volume_node_like_the_self_test(module_on_mrml, mrml_scene, stent_volume, tiny_model):  # noqa: F811
    from mrml_support import ijk_to_ras

    phantom, volume = stent_volume
    logic = module_on_mrml.AnomalyFlagLogic()
    progress = []
    outputs = logic.scoreVolume(
        volume, modelPath=tiny_model, device="cpu", progress=lambda d, t: progress.append((d, t))
    )
    assert progress[-1] == (24, 24)
    heat, table, result = outputs["heatmap"], outputs["table"], outputs["result"]
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
    assert table.GetNumberOfRows() == 24 and outputs["chart"] is not None
    assert logic.flaggedSlices(table) == sorted(result.flagged_indices)
    assert heat.GetDisplayNode().GetColorNodeID()
    for composite in _composites(mrml_scene):
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetForegroundOpacity() > 0

    target = max(range(24), key=lambda k: float(result.slices["normalised"][k]))
    point = logic.jumpToFlaggedSlice(volume, heat, target)
    assert len(point) == 3

    again = logic.scoreVolume(volume, modelPath=tiny_model, device="cpu", thresholdOverride=1.0e6, heatmapNode=heat,
                              tableNode=table, chartNode=outputs["chart"])  # fmt: skip
    assert again["heatmap"] is heat and again["table"] is table
    assert logic.flaggedSlices(table) == [] and again["result"].threshold == 1.0e6


@pytest.mark.slow
def test_logic_runs_the_panels_path_through_the_thread_runner(module_on_mrml, mrml_scene, stent_volume, tiny_model):  # noqa: F811
    from mrml_support import segmentation_from_labels

    phantom, volume = stent_volume
    liver = (phantom.organs == 2).astype(np.uint8)
    segmentation = segmentation_from_labels(mrml_scene, liver, volume, names=["liver"])
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    logic = module_on_mrml.AnomalyFlagLogic()
    job = logic.prepareScoring(volume, modelPath=tiny_model, segmentationNode=segmentation, segmentId=segment_id,
                               device="cpu", batchSize=7)  # fmt: skip
    assert job["roiMask"].shape == phantom.image.shape and job["roiMask"].any()
    assert not any(hasattr(v, "GetID") for v in job.values()), "MRML objects must not go to the worker"

    logic.startScoring(job, volume, segmentationNode=segmentation)
    events = _poll_to_the_end(logic.scoring)
    kinds = [e[0] for e in events]
    assert kinds[-1] == "done" and "progress" in kinds and "log" in kinds, events[-1]
    outputs = events[-1][1]
    result = outputs["result"]
    assert result.roi is not None
    assert not any(result.slices["flagged"] & ~result.slices["in_roi"])
    assert outputs["table"].GetNumberOfRows() == 24
    assert outputs["heatmap"].GetNodeReference("AnomalyFlag.Segmentation") is segmentation

    nodes = mrml_scene.GetNumberOfNodes()
    cancelled = logic.scoring
    cancelled.start(lambda **kw: module_on_mrml._computeScoresTask(**{**kw, "cancelRequested": lambda: True}), job,
                    volume)  # fmt: skip
    assert [e[0] for e in _poll_to_the_end(cancelled, 60)][-1] == "cancelled"
    assert mrml_scene.GetNumberOfNodes() == nodes


@pytest.mark.slow
def test_logic_errors_name_the_cause_and_leave_the_scene_alone(module_on_mrml, mrml_scene, stent_volume, monkeypatch,  # noqa: F811
                                                               tmp_path, tiny_model):  # fmt: skip
    from AnomalyFlagLib.errors import DeviceError

    _, volume = stent_volume
    logic = module_on_mrml.AnomalyFlagLogic()
    deps_module = module_on_mrml.AnomalyFlagDependencies
    nodes = mrml_scene.GetNumberOfNodes()
    with monkeypatch.context() as patch:
        patch.setattr(deps_module, "missingDependencies", lambda: ["torch>=2.1"])
        with pytest.raises(deps_module.DependencyInstallError, match="torch>=2.1"):
            logic.scoreVolume(volume, modelPath=tiny_model)
    with pytest.raises(BundleError, match="nowhere"):
        logic.scoreVolume(volume, modelPath=tmp_path / "nowhere")
    with pytest.raises(DeviceError, match="tpu"):
        logic.scoreVolume(volume, modelPath=tiny_model, device="tpu")
    assert mrml_scene.GetNumberOfNodes() == nodes
