"""The module's review loop through AnomalyFlagLogic on real MRML (slicer-core), AnomalyFlag.py loaded with
the stand-ins for qt/ctk/ScriptedLoadableModule of test_slicer_module_static.py: phantom cases scored by
`anomalyflag worklist` -> loadWorklist -> openReview -> accept, skip, recontour (the segment edited on
the flagged slice as the Segment Editor would) -> versioned .seg.nrrd, decisions table = sidecar ->
nextCase -> close and resume -> `anomalyflag export-training`; and the bad inputs a reviewer meets.
The Widget (Qt) is checked statically in test_slicer_module_static.py."""

import ast
import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.phantom import ORGAN_LABELS
from AnomalyFlagLib.review.active_learning import read_worklist
from AnomalyFlagLib.review.session import current_decisions, image_fingerprint_of, load_sidecar, slice_change
from test_slicer_module_static import (  # noqa: F401 - module_on_mrml and mrml_scene are fixtures
    MODULE_FILE,
    UI_FILE,
    module_on_mrml,
    mrml_scene,
    parameter_node_fields,
    ui_widgets,
)

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


def test_review_loop_end_to_end(module_on_mrml, mrml_scene, fresh_outputs, tmp_path):  # noqa: F811
    from AnomalyFlagMRML.navigation import sliceFrame
    from AnomalyFlagMRML.review import segmentLabelmapArray
    from AnomalyFlagMRML.segmentation import loadSegmentation

    scans, out = fresh_outputs
    rows = read_worklist(out / "worklist.csv")
    index = next(i for i, r in enumerate(rows) if int(r["flagged_slices"]) >= 3)  # accept, skip and recontour
    case = rows[index]["case"]
    organs_file = scans / f"{case}_organs.nrrd"
    organs_bytes = organs_file.read_bytes()
    logic = module_on_mrml.AnomalyFlagLogic()
    assert logic.reviewProgressText() == "No review open."

    # the worklist: the case's image, heatmap and automatic segmentation are loaded; no review without a name
    loaded = logic.loadWorklist(out, index=index)
    assert loaded["case"] == case and logic.worklistIndex == index and len(logic.worklistRows) == len(rows)
    volume, heatmap, segmentation = loaded["volume"], loaded["heatmap"], loaded["segmentation"]
    assert volume.GetScene() is mrml_scene and heatmap is not None and segmentation is not None
    assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert logic.reviewSession is None
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName(LIVER)
    # the volume node is the scored image, voxel for voxel
    assert module_on_mrml._bridge("review").imageFingerprintOfVolumeNode(volume) == image_fingerprint_of(
        scans / f"{case}.nrrd"
    )

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
    logic = module_on_mrml.AnomalyFlagLogic()
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


def test_bad_inputs_are_refused_and_leave_the_decisions_intact(module_on_mrml, mrml_scene, fresh_outputs):  # noqa: F811
    from mrml_support import segmentation_from_labels

    scans, out = fresh_outputs
    case = read_worklist(out / "worklist.csv")[0]["case"]
    logic = module_on_mrml.AnomalyFlagLogic()
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

    # no worklist in the folder, a case without scores
    with pytest.raises(InputError, match="worklist.csv"):
        logic.loadWorklist(scans)
    with pytest.raises(SessionError, match="score the case first"):
        logic.openReview(out, "nowhere", "Dr Bob")
    assert logic.worklistRows and logic.reviewCase == {}


# --------------------------------------------------------------------------------------------------
# The review widget, statically (it needs Qt and the Slicer application): the .ui section, the
# connections, the keyboard shortcuts and their clean-up, the Segment Editor hand-over, and that every
# Logic call of the Widget exists. Each check has a negative control.


REVIEW_WIDGETS = {
    "reviewerLineEdit": "QLineEdit",
    "worklistPathLineEdit": "ctkPathLineEdit",
    "loadWorklistButton": "QPushButton",
    "previousCaseButton": "QPushButton",
    "nextCaseButton": "QPushButton",
    "reviewCaseLabel": "QLabel",
    "reviewProgressLabel": "QLabel",
    "reviewSlicesListWidget": "QListWidget",
    "acceptSliceButton": "QPushButton",
    "recontourSliceButton": "QPushButton",
    "finishRecontourButton": "QPushButton",
    "skipSliceButton": "QPushButton",
    "undoDecisionButton": "QPushButton",
    "reviewNoteLineEdit": "QLineEdit",
    "decisionsTableView": "qMRMLTableView",
}
BUTTON_SLOTS = {
    "loadWorklistButton": "onLoadWorklist",
    "previousCaseButton": "onPreviousCase",
    "nextCaseButton": "onNextCase",
    "acceptSliceButton": "onAcceptSlice",
    "recontourSliceButton": "onRecontourSlice",
    "finishRecontourButton": "onFinishRecontour",
    "skipSliceButton": "onSkipSlice",
    "undoDecisionButton": "onUndoDecision",
}
SHORTCUTS = {"A": "onAcceptSlice", "R": "onRecontourSlice", "S": "onSkipSlice"}


def _class(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls, name):
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def review_section_widgets(ui_text):
    """{name: class} of the widgets inside the 'Review' collapsible section."""
    root = ET.fromstring(ui_text)
    for widget in root.iter("widget"):
        if (
            widget.get("class") == "ctkCollapsibleButton"
            and widget.findtext("property[@name='text']/string") == "Review"
        ):
            return {w.get("name"): w.get("class") for w in widget.iter("widget") if w is not widget}
    return {}


def connected_buttons(py_source):
    """{ui name: slot} of `self.ui.<name>.connect("clicked(bool)", self.<slot>)` in Widget.setup()."""
    setup = _method(_class(ast.parse(py_source), "AnomalyFlagWidget"), "setup")
    out = {}
    for node in ast.walk(setup):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and ast.unparse(owner).startswith("self.ui.") and len(node.args) == 2:
                if isinstance(node.args[1], ast.Attribute):
                    out[owner.attr] = (node.args[0].value, node.args[1].attr)
    return {name: slot for name, (signal, slot) in out.items() if signal == "clicked(bool)"}


def shortcut_bindings(py_source):
    """{key: slot} of the qt.QShortcut(qt.QKeySequence(key), ...) made in Widget.setup() from a
    (key, self.slot) table, and whether cleanup() disconnects and drops them."""
    widget = _class(ast.parse(py_source), "AnomalyFlagWidget")
    setup = _method(widget, "setup")
    made = any(
        isinstance(n, ast.Call) and ast.unparse(n.func) == "qt.QShortcut" and n.args
        and ast.unparse(n.args[0]).startswith("qt.QKeySequence(")
        for n in ast.walk(setup)
    )  # fmt: skip
    bindings = {}
    for node in ast.walk(setup):
        if isinstance(node, ast.For) and any(
            isinstance(n, ast.Call) and ast.unparse(n.func) == "qt.QShortcut" for n in ast.walk(node)
        ):
            for pair in node.iter.elts:
                bindings[pair.elts[0].value] = pair.elts[1].attr
    cleanup = ast.unparse(_method(widget, "cleanup"))
    cleaned = (
        "shortcut.disconnect(" in cleanup
        and "shortcut.setParent(None)" in cleanup
        and "self._shortcuts = []" in cleanup
    )
    return (bindings if made else {}), cleaned


def logic_calls_missing(py_source):
    """`self.logic.<name>` used by the Widget that AnomalyFlagLogic does not define."""
    tree = ast.parse(py_source)
    logic = _class(tree, "AnomalyFlagLogic")
    defined = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    init = _method(logic, "__init__")
    defined |= {
        t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)
    }
    used = {
        n.attr
        for n in ast.walk(_class(tree, "AnomalyFlagWidget"))
        if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self.logic"
    }
    return sorted(used - defined - {"getParameterNode"})  # ScriptedLoadableModuleLogic's


def test_review_section_has_its_widgets():
    ui_text = UI_FILE.read_text()
    section = review_section_widgets(ui_text)
    assert {name: section.get(name) for name in REVIEW_WIDGETS} == REVIEW_WIDGETS
    assert (
        review_section_widgets(ui_text.replace('name="skipSliceButton"', 'name="skip"')).get("skipSliceButton") is None
    )
    texts = {w.get("name"): w.findtext("property[@name='text']/string") for w in ET.fromstring(ui_text).iter("widget")}
    for key, slot in SHORTCUTS.items():
        button = next(b for b, s in BUTTON_SLOTS.items() if s == slot)
        assert f"({key})" in texts[button], "the button names its shortcut"
    fields = parameter_node_fields(MODULE_FILE.read_text())
    assert fields["reviewer"] == "str" and fields["worklistFolder"] == "pathlib.Path"
    assert set(REVIEW_WIDGETS) <= set(ui_widgets(ui_text))


def test_review_buttons_are_connected_to_widget_methods():
    source = MODULE_FILE.read_text()
    connected = connected_buttons(source)
    assert {b: connected.get(b) for b in BUTTON_SLOTS} == BUTTON_SLOTS
    widget = _class(ast.parse(source), "AnomalyFlagWidget")
    methods = {n.name for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert set(BUTTON_SLOTS.values()) | {"onReviewSliceSelected"} <= methods
    broken = source.replace('self.ui.nextCaseButton.connect("clicked(bool)", self.onNextCase)', "")
    assert "nextCaseButton" not in connected_buttons(broken)


def test_review_shortcuts_are_made_and_cleaned_up():
    source = MODULE_FILE.read_text()
    bindings, cleaned = shortcut_bindings(source)
    assert bindings == SHORTCUTS and cleaned
    _, cleaned = shortcut_bindings(source.replace("shortcut.setParent(None)", "pass"))
    assert not cleaned
    bindings, _ = shortcut_bindings(source.replace('("S", self.onSkipSlice)', '("S", self.onUndoDecision)'))
    assert bindings["S"] == "onUndoDecision"


def test_recontour_opens_the_segment_editor_on_the_target():
    source = MODULE_FILE.read_text()
    body = ast.unparse(_method(_class(ast.parse(source), "AnomalyFlagWidget"), "_openSegmentEditor"))
    for call in (
        "slicer.util.selectModule('SegmentEditor')",
        "prepareSegmentEditorNode(target, editorWidget.mrmlSegmentEditorNode())",
        "editorWidget.setSegmentationNode(segmentationNode)",
        "editorWidget.setSourceVolumeNode(volumeNode)",
        "editorWidget.setMasterVolumeNode(volumeNode)",
        "editorWidget.setCurrentSegmentID(target['segmentID'])",
        "self.logic.jumpToReviewSlice(target['sliceIndex'])",
    ):
        assert call in body, call
    recontour = ast.unparse(_method(_class(ast.parse(source), "AnomalyFlagWidget"), "onRecontourSlice"))
    assert "self.logic.startRecontour(sliceIndex)" in recontour and "self._openSegmentEditor(target)" in recontour


def test_every_logic_call_of_the_widget_exists():
    source = MODULE_FILE.read_text()
    assert logic_calls_missing(source) == []
    assert logic_calls_missing(source.replace("self.logic.acceptSlice", "self.logic.acceptSlices")) == ["acceptSlices"]


def test_review_logic_methods_are_documented_and_gui_free():
    tree = ast.parse(MODULE_FILE.read_text())
    logic = _class(tree, "AnomalyFlagLogic")
    for name in ("openReview", "reviewQueue", "reviewProgressText", "acceptSlice", "skipSlice", "startRecontour",
                 "finishRecontour", "closeReview", "loadWorklist", "nextCase", "previousCase"):  # fmt: skip
        method = _method(logic, name)
        assert ast.get_docstring(method), f"{name} has no docstring"
        used = {ast.unparse(n) for n in ast.walk(method) if isinstance(n, ast.Attribute)}
        assert not any(u.startswith(("qt.", "ctk.", "self.ui", "slicer.util.selectModule")) for u in used), name
