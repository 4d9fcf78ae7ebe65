"""The module's review loop, AnomalyFlagMRML.reviewController.ReviewController, on real MRML (slicer-core):
phantom cases scored by `anomalyflag worklist` -> loadWorklist -> openReview -> accept, skip, recontour
(the segment edited on the flagged slice as the Segment Editor would) -> versioned .seg.nrrd, decisions
table = sidecar -> nextCase -> close and resume -> `anomalyflag export-training`; and the bad inputs a
reviewer meets. The Review section of the panel that drives it is tested in test_module_ui.py."""

import json
import os
import shutil

import numpy as np
import pytest
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.phantom import ORGAN_LABELS
from AnomalyFlagLib.review.active_learning import read_worklist
from AnomalyFlagLib.review.session import current_decisions, image_fingerprint_of, load_sidecar, slice_change
from AnomalyFlagMRML.reviewController import ReviewController
from module_support import mrml_scene  # noqa: F401 - a fixture

LIVER = f"Label_{ORGAN_LABELS['liver']}"  # segments imported from the organ label map are named by value


@pytest.fixture(scope="module")
def worklist_folder(flagging_model, phantom_anomalous_dir, tmp_path_factory):
    """The anomalous phantoms (image, anomaly mask, organ label map) scored by `anomalyflag worklist`."""
    scans = tmp_path_factory.mktemp("review_scans")
    for f in phantom_anomalous_dir.iterdir():
        shutil.copy(f, scans / f.name)
    out = tmp_path_factory.mktemp("review_outputs")
    model = str(flagging_model)
    rc = main(["worklist", "--model", model, "--input", str(scans), "--output", str(out), "--device", "cpu"])
    assert rc == 0
    return scans, out


@pytest.fixture
def fresh_outputs(worklist_folder, tmp_path):
    """A private copy of the scored outputs (tests that write sidecars do not disturb each other)."""
    scans, out = worklist_folder
    copy = tmp_path / "outputs"
    shutil.copytree(out, copy)
    return scans, copy


def _edit_segment_on_slice(scene, segmentation, segment_id, volume, slice_index):
    """What a reviewer does in the Segment Editor: erase the segment's anterior half on one slice and paint a
    small square elsewhere on it. Returns the (k, j, i) masks before and after."""
    import slicer
    import vtk
    from AnomalyFlagMRML.navigation import sliceFrame
    from AnomalyFlagMRML.review import segmentLabelmapArray
    from AnomalyFlagMRML.volumes import geometryFromVolumeNode, ijkToRASArray, updateVolumeNodeFromArray

    before = segmentLabelmapArray(segmentation, segment_id, volume)
    _, frame = sliceFrame(volume)
    after = before.copy()
    plane = frame.view(after)[slice_index]
    rows = np.flatnonzero(plane.any(axis=1))
    if rows.size:
        plane[: rows[len(rows) // 2]] = False
    plane[2:6, 2:6] = True  # a corner far from the organs: always a change
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
    updateVolumeNodeFromArray(labelmap, after.astype(np.uint8), geometryFromVolumeNode(volume), ijkToRASArray(volume))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
    scene.RemoveNode(labelmap)
    np.testing.assert_array_equal(segmentLabelmapArray(segmentation, segment_id, volume), after)
    return before, after


def _table_rows(table_node):
    table = table_node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{c: table.GetValueByName(r, c).ToString() for c in columns} for r in range(table.GetNumberOfRows())]


def _assert_table_is_sidecar(table_node, out, case):
    data = load_sidecar(out, case)
    decided = current_decisions(data)
    rows = _table_rows(table_node)
    assert [int(r["slice"]) for r in rows] == [q["slice"] for q in data["queue"]]
    for row in rows:
        record = decided.get(int(row["slice"]))
        assert row["decision"] == (record["decision"] if record else "")
        assert row["note"] == (record["note"] if record else "")
        if record and record.get("change"):
            assert float(row["dice"]) == pytest.approx(record["change"]["dice"])
            assert float(row["changed_voxels"]) == record["change"]["changed_voxels"]
    assert table_node.GetAttribute("AnomalyFlag.ReviewProgress") == f"{len(decided)}/{len(data['queue'])}"


@pytest.mark.slow
def test_review_loop_end_to_end(mrml_scene, fresh_outputs, tmp_path):  # noqa: F811
    from AnomalyFlagMRML.navigation import sliceFrame
    from AnomalyFlagMRML.review import imageFingerprintOfVolumeNode, segmentLabelmapArray
    from AnomalyFlagMRML.segmentation import loadSegmentation

    scans, out = fresh_outputs
    rows = read_worklist(out / "worklist.csv")
    index = next(i for i, r in enumerate(rows) if int(r["flagged_slices"]) >= 3)  # accept, skip and recontour
    case = rows[index]["case"]
    organs_file = scans / f"{case}_organs.nrrd"
    organs_bytes = organs_file.read_bytes()
    logic = ReviewController()
    assert logic.reviewProgressText() == "No review open." and logic.caseText() == "No case loaded."

    # the worklist: the case's image, heatmap and automatic segmentation are loaded; no review without a name
    loaded = logic.loadWorklist(out, index=index)
    assert loaded["case"] == case and logic.worklistIndex == index and len(logic.worklistRows) == len(rows)
    assert logic.caseText() == f"{case} ({index + 1} of {len(rows)})"
    volume, heatmap, segmentation = loaded["volume"], loaded["heatmap"], loaded["segmentation"]
    assert volume.GetScene() is mrml_scene and heatmap is not None and segmentation is not None
    assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert logic.reviewSession is None
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName(LIVER)
    # the volume node is the scored image, voxel for voxel
    assert imageFingerprintOfVolumeNode(volume) == image_fingerprint_of(scans / f"{case}.nrrd")

    session = logic.openReview(out, case, "Dr Ann", segmentId=LIVER)
    assert session.reviewer == "Dr Ann" and session.lock_path.is_file()
    assert logic.reviewCase["segmentId"] == segmentation.GetSegmentation().GetSegmentIdBySegmentName(LIVER)
    queue = logic.reviewQueue()
    total = len(queue)
    assert total == int(rows[index]["flagged_slices"]) >= 3
    scores = [q["score"] for q in queue]
    assert scores == sorted(scores, reverse=True) and all(q["decision"] is None for q in queue)
    assert logic.reviewProgressText() == f"0 of {total} reviewed"
    accept, skip, recontour = (q["slice"] for q in queue[:3])

    # selecting a slice centres the views on its hottest region, on that slice
    point = logic.jumpToReviewSlice(accept)
    _, frame = sliceFrame(volume)
    assert len(point) == 3

    logic.acceptSlice(accept)
    logic.skipSlice(skip, note="motion artefact")
    assert logic.nextPendingSlice() == recontour
    target = logic.startRecontour(recontour)
    assert target["segmentationNodeID"] == segmentation.GetID() and target["sourceVolumeNodeID"] == volume.GetID()
    assert target["segmentName"] == LIVER and target["sliceIndex"] == recontour
    with pytest.raises(InputError, match="not a flagged slice"):
        logic.startRecontour(next(k for k in range(24) if k not in {q["slice"] for q in queue}))
    before, after = _edit_segment_on_slice(mrml_scene, segmentation, target["segmentID"], volume, recontour)
    record = logic.finishRecontour(recontour, note="liver edge")
    expected = slice_change(before, after, recontour, frame)
    assert record["decision"] == "recontoured" and record["change"] == expected
    assert expected["changed_voxels"] > 0 and expected["dice"] < 1.0
    assert record["label"] == f"{case}_seg_v1.seg.nrrd"

    # progress, the table, the files
    assert logic.reviewProgressText() == f"3 of {total} reviewed"
    _assert_table_is_sidecar(logic.decisionsTableNode, out, case)
    assert [q["decision"] for q in logic.reviewQueue()[:3]] == ["accepted", "skipped", "recontoured"]
    assert logic.queueItemText(logic.reviewQueue()[2]).endswith(
        f"recontoured    Dice {expected['dice']:.3f}, {expected['changed_voxels']} voxels changed"
    )
    v1 = out / f"{case}_seg_v1.seg.nrrd"
    assert v1.is_file() and organs_file.read_bytes() == organs_bytes
    saved = loadSegmentation(v1, mrml_scene, "saved v1")
    np.testing.assert_array_equal(segmentLabelmapArray(saved, LIVER, volume), after)
    mrml_scene.RemoveNode(saved)
    with pytest.raises(InputError, match="Recontour on it first"):
        logic.finishRecontour(accept)

    # the other case of the worklist: this case's nodes go, the review follows the reviewer
    table_node = logic.decisionsTableNode
    other = logic.nextCase() if index + 1 < len(rows) else logic.previousCase()
    assert other["case"] != case and volume.GetScene() is None and heatmap.GetScene() is None
    assert segmentation.GetScene() is None
    assert logic.reviewSession.case == other["case"] and not session.lock_path.exists()
    assert logic.decisionsTableNode is table_node and table_node.GetAttribute("AnomalyFlag.Case") == other["case"]
    if logic.reviewQueue():
        logic.acceptSlice(logic.nextPendingSlice())
    logic.unloadCase()
    assert other["volume"].GetScene() is None and logic.reviewSession is None

    # close and reopen (a new Slicer session): resumes, with the saved edit as the segmentation to work on
    logic = ReviewController()
    resumed = logic.loadWorklist(out, reviewer="Dr Ann", index=index, segmentName=LIVER)
    assert resumed["case"] == case and logic.reviewSession is not None
    assert logic.reviewProgressText() == f"3 of {total} reviewed"
    assert [q["decision"] for q in logic.reviewQueue()[:3]] == ["accepted", "skipped", "recontoured"]
    _assert_table_is_sidecar(logic.decisionsTableNode, out, case)
    assert "seg_v1" in resumed["segmentation"].GetName()
    np.testing.assert_array_equal(segmentLabelmapArray(resumed["segmentation"], LIVER, resumed["volume"]), after)
    assert len(load_sidecar(out, case)["sessions"]) == 2

    # export-training lists the case with its edited label
    datalist_path = tmp_path / "train" / "datalist.json"
    assert main(["export-training", "--input", str(out), "--output", str(datalist_path)]) == 0
    datalist = json.loads(datalist_path.read_text())
    entry = next(e for e in datalist["training"] if e["case"] == case)
    assert (datalist_path.parent / entry["label"]).resolve() == v1.resolve()
    assert (datalist_path.parent / entry["image"]).resolve() == (scans / f"{case}.nrrd").resolve()
    assert entry["recontoured_slices"] == [recontour] and entry["reviewers"] == ["Dr Ann"]

    # a further recontour in the resumed session: measured against the original, saved as v2 with both edits
    fourth = queue[3]["slice"] if total > 3 else recontour
    logic.startRecontour(fourth)
    record = logic.finishRecontour(fourth)
    original = loadSegmentation(organs_file, mrml_scene, referenceVolumeNode=resumed["volume"])
    original_mask = segmentLabelmapArray(original, LIVER, resumed["volume"])
    assert record["change"] == slice_change(original_mask, after, fourth, frame)
    assert record["label"] == f"{case}_seg_v2.seg.nrrd" and v1.is_file()
    assert organs_file.read_bytes() == organs_bytes
    logic.closeReview()
    assert not (out / f"{case}_review.lock").exists()


@pytest.mark.slow
def test_bad_inputs_are_refused_and_leave_the_decisions_intact(mrml_scene, fresh_outputs):  # noqa: F811
    from mrml_support import segmentation_from_labels

    scans, out = fresh_outputs
    case = read_worklist(out / "worklist.csv")[0]["case"]
    logic = ReviewController()
    loaded = logic.loadWorklist(out)
    volume = loaded["volume"]
    with pytest.raises(InputError, match="reviewer's name"):
        logic.openReview(out, case, "  ")
    logic.openReview(out, case, "Dr Ann")
    logic.acceptSlice(logic.nextPendingSlice(), note="kept")
    logic.closeReview()
    sidecar = out / f"{case}_review.json"
    good = sidecar.read_bytes()

    def refused(error, match, **kwargs):
        with pytest.raises(error, match=match):
            logic.openReview(out, case, "Dr Bob", **kwargs)
        assert logic.reviewSession is None
        assert not (out / f"{case}_review.lock").exists()

    # a sidecar written for another model
    data = json.loads(good)
    data["model"]["fingerprint"] = "another-model"
    other_model = json.dumps(data).encode()
    sidecar.write_bytes(other_model)
    refused(SessionError, "another model")
    assert sidecar.read_bytes() == other_model

    # a damaged sidecar
    damaged = good[: len(good) // 2]
    sidecar.write_bytes(damaged)
    refused(SessionError, "damaged")
    assert sidecar.read_bytes() == damaged

    # a sidecar written for another image: same grid, other voxels
    sidecar.write_bytes(good)
    data = json.loads(good)
    assert data["image"]["fingerprint_kind"] == "content"
    data["image"]["fingerprint"] = "sha256:" + "0" * 64
    other_image = json.dumps(data).encode()
    sidecar.write_bytes(other_image)
    refused(SessionError, "another image")
    assert sidecar.read_bytes() == other_image
    sidecar.write_bytes(good)

    # a segmentation drawn on another grid, and a volume that is not the scored image
    from AnomalyFlagMRML.volumes import geometryFromVolumeNode, updateVolumeNodeFromArray

    coarse = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "coarse")
    geometry = geometryFromVolumeNode(volume)
    coarse_geometry = type(geometry)((32, 32, 12), tuple(2 * s for s in geometry.spacing), geometry.origin,
                                     geometry.direction)  # fmt: skip
    updateVolumeNodeFromArray(coarse, np.zeros((12, 32, 32), np.int16), coarse_geometry)
    labels = np.zeros((12, 32, 32), np.uint8)
    labels[4:8, 10:20, 10:20] = 1
    foreign = segmentation_from_labels(mrml_scene, labels, coarse, "foreign", names=["liver"])
    refused(InputError, "another voxel grid", volumeNode=volume, segmentationNode=foreign)
    refused(InputError, "not the image", volumeNode=coarse)
    shifted = segmentation_from_labels(mrml_scene, np.pad(labels, ((0, 12), (0, 32), (0, 32))), volume, "shifted")
    shifted.SetAndObserveTransformNodeID(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    refused(InputError, "different transforms", volumeNode=volume, segmentationNode=shifted)
    assert sidecar.read_bytes() == good

    # an output folder that cannot be written: a clear error, nothing written
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = out.parent / "readonly"
        shutil.copytree(out, locked)
        (locked / f"{case}_review.json").unlink()
        locked.chmod(0o555)
        try:
            with pytest.raises(SessionError, match="not writable"):
                logic.openReview(locked, case, "Dr Bob")
        finally:
            locked.chmod(0o755)
        assert not (locked / f"{case}_review.json").exists()

    # the existing decisions are intact and readable, and the review resumes
    session = logic.openReview(out, case, "Dr Bob")
    assert [r["note"] for r in session.history] == ["kept"]
    assert logic.reviewProgressText().startswith("1 of ")
    # a failed save records nothing: the lock is gone, so the decision is refused and the sidecar unchanged
    before = sidecar.read_bytes()
    session.lock_path.unlink()
    with pytest.raises(SessionError, match="lock"):
        logic.skipSlice(logic.nextPendingSlice())
    assert sidecar.read_bytes() == before
    logic.closeReview()

    # no worklist folder chosen, no worklist in the folder, a case without scores
    with pytest.raises(InputError, match="Choose the worklist folder"):
        logic.loadWorklist("")
    with pytest.raises(InputError, match="worklist.csv"):
        logic.loadWorklist(scans)
    with pytest.raises(SessionError, match="score the case first"):
        logic.openReview(out, "nowhere", "Dr Bob")
    assert logic.worklistRows and logic.reviewCase == {}


def test_review_folder_without_a_worklist_walks_the_scored_cases_in_name_order(mrml_scene, fresh_outputs, tmp_path):  # noqa: F811
    _scans, out = fresh_outputs
    ranked = [r["case"] for r in read_worklist(out / "worklist.csv")]
    (out / "worklist.csv").unlink()
    logic = ReviewController()
    with pytest.raises(InputError, match="worklist"):
        logic.loadWorklist(out)
    loaded = logic.loadReviewFolder(out, reviewer="Dr Ann")
    assert logic.loadedCase == {k: loaded[k] for k in ("case", "volume", "heatmap", "segmentation")}
    assert loaded["case"] == sorted(ranked)[0] and [r["case"] for r in logic.worklistRows] == sorted(ranked)
    assert loaded["volume"] is not None and loaded["heatmap"] is not None and loaded["segmentation"] is not None
    assert logic.reviewSession is not None and logic.reviewSession.reviewer == "Dr Ann"
    assert logic.nextCase()["case"] == sorted(ranked)[1]
    logic.unloadCase()
    assert logic.loadedCase == {}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no scored cases"):
        logic.loadReviewFolder(empty)
