"""Review in real MRML (slicer-core): versioned .seg.nrrd saves, the change an edit made on a slice,
the decisions table and the Segment Editor target."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.orientation import AxialFrame, slice_positions_mm
from AnomalyFlagLib.phantom import ORGAN_LABELS, make_phantom
from AnomalyFlagLib.review.session import ReviewSession, slice_change
from AnomalyFlagLib.roi import roi_on_image_grid
from mrml_support import (
    OBLIQUE,
    ijk_to_ras,
    load_segmentation,
    load_volume,
    save_segmentation,
    scene_fixture,
    segmentation_from_labels,
    write_volume,
)
from review_support import make_case_outputs

# k runs anterior, j superior: the scoring's slices are taken along j
CORONAL_STORED = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])


@pytest.fixture
def mrml_scene():
    yield from scene_fixture()


def _case(scene, folder, direction):
    """A phantom CT and its liver + spleen segmentation, saved as Slicer saves it (cropped .seg.nrrd)."""
    phantom = make_phantom(num_slices=16, size=48, seed=3)
    labels = np.zeros(phantom.organs.shape, dtype=np.int16)
    labels[phantom.organs == ORGAN_LABELS["liver"]] = 1
    labels[phantom.organs == ORGAN_LABELS["spleen"]] = 2
    ct_path = folder / "case1.nrrd"
    image = write_volume(ct_path, phantom.image, spacing=(1.5, 1.5, 3.0), direction=direction)
    volume = load_volume(scene, ct_path, "case1")
    segmentation = segmentation_from_labels(scene, labels, volume, "organs", names=["liver", "spleen"])
    original = save_segmentation(segmentation, folder / "case1_seg.seg.nrrd")
    return image, volume, labels, original


def _segment_mask_from_file(path, name, geometry):
    """The library's reading of one named segment of a .seg.nrrd, on the image grid (SimpleITK only)."""
    image = sitk.ReadImage(str(path))
    for i in range(100):
        if image.HasMetaDataKey(f"Segment{i}_Name") and image.GetMetaData(f"Segment{i}_Name") == name:
            value = int(image.GetMetaData(f"Segment{i}_LabelValue"))
            assert int(image.GetMetaData(f"Segment{i}_Layer")) == 0
            return roi_on_image_grid(image, geometry, labels=[value], allow_empty=True)
    raise AssertionError(f"no segment {name} in {path}")


@pytest.mark.parametrize("direction", [OBLIQUE, CORONAL_STORED], ids=["oblique-axial", "coronal-stored"])
def test_versioned_save_and_slice_change_with_real_seg_nrrd(mrml_scene, tmp_path, direction):
    from AnomalyFlagMRML.review import (
        saveEditedSegmentationVersion,
        segmentLabelmapArray,
        sliceChangeFromSegmentations,
    )
    from AnomalyFlagMRML.volumes import geometryFromVolumeNode, updateVolumeNodeFromArray

    image, volume, labels, original = _case(mrml_scene, tmp_path, direction)
    original_bytes = original.read_bytes()
    geometry = Geometry.from_image(image)
    frame = AxialFrame.from_geometry(geometry)
    assert frame.slice_ijk_axis == (1 if direction is CORONAL_STORED else 2)

    edited = load_segmentation(mrml_scene, original, "edited")
    liver = segmentLabelmapArray(edited, "liver", volume)
    np.testing.assert_array_equal(liver, labels == 1)  # the round trip through the file is exact

    # the reviewer erases the anterior half of the liver on its largest slice
    view = frame.view(liver)
    areas = view.sum(axis=(1, 2))
    target = int(np.argmax(areas))
    other = int(np.flatnonzero(areas)[0])
    empty = int(np.flatnonzero(areas == 0)[0])
    assert other != target
    new_mask = liver.copy()
    new_view = frame.view(new_mask)
    rows = np.flatnonzero(new_view[target].any(axis=1))
    cut = rows[len(rows) // 2]
    removed = int(new_view[target, :cut].sum())
    new_view[target, :cut] = False
    assert 0 < removed < areas[target]
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "edit")
    updateVolumeNodeFromArray(labelmap, new_mask.astype(np.uint8), geometryFromVolumeNode(volume), ijk_to_ras(volume))
    import slicer
    import vtk

    liver_id = edited.GetSegmentation().GetSegmentIdBySegmentName("liver")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(liver_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, edited, ids)
    mrml_scene.RemoveNode(labelmap)
    np.testing.assert_array_equal(segmentLabelmapArray(edited, "liver", volume), new_mask)

    # versioned saves: v1, v2; nothing existing is replaced
    v1 = saveEditedSegmentationVersion(edited, tmp_path, "case1", volume)
    v1_bytes = v1.read_bytes()
    v2 = saveEditedSegmentationVersion(edited, tmp_path, "case1", volume)
    assert (v1.name, v2.name) == ("case1_seg_v1.seg.nrrd", "case1_seg_v2.seg.nrrd")
    assert v1.read_bytes() == v1_bytes and original.read_bytes() == original_bytes
    assert edited.GetStorageNode().GetFileName() == str(original)  # the node still points at the original
    assert edited.GetAttribute("AnomalyFlag.SavedVersion") == str(v2)

    # the saved version lies on the image's full grid, and reloads to the edited segment
    saved = sitk.ReadImage(str(v1))
    assert Geometry.from_image(saved).matches(geometry)
    reloaded = load_segmentation(mrml_scene, v1, "reloaded")
    np.testing.assert_array_equal(segmentLabelmapArray(reloaded, "liver", volume), new_mask)
    np.testing.assert_array_equal(segmentLabelmapArray(reloaded, "spleen", volume), labels == 2)

    # the change measure: from the original file, node, or array, and the library's own reading
    expected = {
        "dice": pytest.approx(2 * (areas[target] - removed) / (2 * areas[target] - removed)),
        "changed_voxels": removed,
        "original_voxels": int(areas[target]),
        "edited_voxels": int(areas[target] - removed),
    }
    assert sliceChangeFromSegmentations(original, edited, "liver", volume, target) == expected
    original_node = load_segmentation(mrml_scene, original, "original")
    assert sliceChangeFromSegmentations(original_node, edited, liver_id, volume, target) == expected
    assert sliceChangeFromSegmentations(labels == 1, edited, "liver", volume, target) == expected
    unchanged = sliceChangeFromSegmentations(original, edited, "liver", volume, other)
    assert unchanged["dice"] == 1.0 and unchanged["changed_voxels"] == 0 and unchanged["original_voxels"] > 0
    assert sliceChangeFromSegmentations(original, edited, "liver", volume, empty)["dice"] == 1.0
    library = slice_change(
        _segment_mask_from_file(original, "liver", geometry),
        _segment_mask_from_file(v1, "liver", geometry),
        target,
        frame,
    )
    assert library == expected


def test_decisions_table_follows_the_sidecar(mrml_scene, tmp_path):
    from AnomalyFlagLib.review.session import load_sidecar
    from AnomalyFlagMRML.review import DECISION_COLUMNS, decisionsToTableNode

    make_case_outputs(tmp_path, "case1", flagged=(3, 7, 8, 15, 20, 31))
    change = {"dice": 0.75, "changed_voxels": 9, "original_voxels": 20, "edited_voxels": 14}
    with ReviewSession.open(tmp_path, "case1", "Dr Ann") as session:
        session.decide(31, "accepted")
        table_node = decisionsToTableNode(session)
        session.decide(20, "recontoured", note="missed edge", change=change)
        assert decisionsToTableNode(session, table_node) is table_node
        table = table_node.GetTable()
        assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(DECISION_COLUMNS)
        assert table.GetNumberOfRows() == 6
        rows = [{c: table.GetValueByName(r, c).ToString() for c in DECISION_COLUMNS} for r in range(6)]
        assert [int(r["slice"]) for r in rows] == [q["slice"] for q in session.queue]
        assert rows[0]["decision"] == "accepted" and rows[0]["reviewer"] == "Dr Ann"
        assert rows[1]["decision"] == "recontoured" and rows[1]["note"] == "missed edge"
        assert float(rows[1]["dice"]) == 0.75 and float(rows[1]["changed_voxels"]) == 9
        assert rows[1]["time"] == session.decision_for(20)["time"]
        assert math.isnan(float(rows[0]["dice"])) and rows[2]["decision"] == ""
        assert float(rows[0]["score"]) == pytest.approx(session.queue[0]["normalised"])
        assert table_node.GetAttribute("AnomalyFlag.ReviewProgress") == "2/6"
        session.undo_last()
        decisionsToTableNode(session, table_node)
        assert table_node.GetTable().GetValueByName(1, "decision").ToString() == ""
    from_file = decisionsToTableNode(load_sidecar(tmp_path, "case1"))
    assert from_file.GetTable().GetValueByName(0, "decision").ToString() == "accepted"
    assert from_file.GetAttribute("AnomalyFlag.ReviewProgress") == "1/6"


@pytest.mark.parametrize("direction", [OBLIQUE, CORONAL_STORED], ids=["oblique-axial", "coronal-stored"])
def test_recontour_target_and_segment_editor_node(mrml_scene, tmp_path, direction):
    from AnomalyFlagLib.errors import InputError
    from AnomalyFlagMRML.review import prepareSegmentEditorNode, recontourTarget

    image, volume, _, original = _case(mrml_scene, tmp_path, direction)
    segmentation = load_segmentation(mrml_scene, original, "organs")
    geometry = Geometry.from_image(image)
    frame = AxialFrame.from_geometry(geometry)
    target = recontourTarget(segmentation, "spleen", volume, 9)
    assert target["segmentationNodeID"] == segmentation.GetID()
    assert target["sourceVolumeNodeID"] == volume.GetID()
    assert target["segmentName"] == "spleen" and target["sliceIndex"] == 9
    assert segmentation.GetSegmentation().GetSegment(target["segmentID"]).GetName() == "spleen"
    # the point lies on slice 9: its superior coordinate is that slice's (RAS S = LPS S)
    z = slice_positions_mm(geometry, frame)[9]
    assert target["sliceRAS"][2] == pytest.approx(z, abs=1e-3)  # the slice centre (no heatmap given)
    editor = prepareSegmentEditorNode(target)
    assert editor.GetSegmentationNode() is segmentation
    source = editor.GetSourceVolumeNode() if hasattr(editor, "GetSourceVolumeNode") else editor.GetMasterVolumeNode()
    assert source is volume and editor.GetSelectedSegmentID() == target["segmentID"]
    with pytest.raises(InputError, match="no segment 'kidney'"):
        recontourTarget(segmentation, "kidney", volume, 9)
    with pytest.raises(InputError, match="outside"):
        recontourTarget(segmentation, "spleen", volume, 99)
