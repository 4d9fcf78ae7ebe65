"""Review in the scene: versioned saves of edited segmentations, the change an edit made on a slice,
the decisions as a table node kept in step with the session sidecar, and what the Segment Editor must
select to recontour a flagged slice.

Slicer + vtk only (no Qt). The review session itself is AnomalyFlagLib.review.ReviewSession; this module
turns nodes into what it needs. The original segmentation file is never written: every save goes to a new
`<case>_seg_v{N}.seg.nrrd` (AnomalyFlagLib.label_versions).
"""

import logging
import math
from pathlib import Path

import numpy as np
import slicer
import vtk
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.label_versions import write_new_version
from AnomalyFlagLib.review import current_decisions, slice_change

from .navigation import hottestPointRAS, sliceFrame

ATTR_ROLE = "AnomalyFlag.Role"
ATTR_CASE = "AnomalyFlag.Case"
ATTR_SIDECAR = "AnomalyFlag.ReviewSidecar"
ATTR_PROGRESS = "AnomalyFlag.ReviewProgress"
ATTR_SAVED_VERSION = "AnomalyFlag.SavedVersion"

DECISION_COLUMNS = ("slice", "score", "decision", "reviewer", "time", "note", "dice", "changed_voxels")
_COLUMN_INFO = {
    "slice": "slice index along the volume's axis closest to superior-inferior",
    "score": "normalised anomaly score of the slice",
    "decision": "accepted, recontoured or skipped (empty: not reviewed yet)",
    "reviewer": "who decided",
    "time": "when (UTC)",
    "note": "reviewer's note",
    "dice": "Dice between the original and the edited segment on this slice (recontoured only)",
    "changed_voxels": "voxels of this slice whose segment membership the edit changed (recontoured only)",
}


def _scene(node=None):
    scene = node.GetScene() if node is not None else None
    return scene or slicer.mrmlScene


def _segmentId(segmentationNode, segmentId):
    """A segment's ID from its ID or name; None when absent."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentId and segmentation.GetSegment(segmentId) is not None:
        return segmentId
    byName = segmentation.GetSegmentIdBySegmentName(segmentId or "")
    return byName or None


def _requireSegmentId(segmentationNode, segmentId):
    found = _segmentId(segmentationNode, segmentId)
    if found is None:
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'"
            f"{' (its segments: ' + ', '.join(names) + ')' if names else ' (it has no segments)'}."
        )
    return found


# ----------------------------------------------------------------------------------------------------
# Segments as arrays on the reference grid


def segmentLabelmapArray(segmentationNode, segmentId, referenceVolumeNode) -> np.ndarray:
    """Boolean (k, j, i) mask of one segment exported to a labelmap on the reference volume's grid
    (an empty segment gives an all-false mask)."""
    if referenceVolumeNode is None or referenceVolumeNode.GetImageData() is None:
        raise InputError("No reference volume (with image data) given for the segmentation.")
    segmentId = _requireSegmentId(segmentationNode, segmentId)
    scene = _scene(segmentationNode)
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AnomalyFlag review export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmapNode, referenceVolumeNode
        )
        if not ok:
            raise InputError(
                f"segment '{segmentId}' of '{segmentationNode.GetName()}' cannot be exported onto the grid of "
                f"volume '{referenceVolumeNode.GetName()}'."
            )
        dims = referenceVolumeNode.GetImageData().GetDimensions()
        image = labelmapNode.GetImageData()
        if image is None or image.GetPointData().GetScalars() is None:
            return np.zeros(dims[::-1], dtype=bool)
        from vtk.util import numpy_support

        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        if tuple(image.GetDimensions()) != tuple(dims):
            raise InputError(f"segment '{segmentId}' was exported with size {image.GetDimensions()}, not {dims}.")
        return array.reshape(dims[::-1]) != 0
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        if displayNode is not None:
            scene.RemoveNode(displayNode)
        scene.RemoveNode(labelmapNode)


def loadSegmentationFile(path, scene=None, name=None):
    """A segmentation node read from a .seg.nrrd with a storage node of its own (the caller removes it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation file '{path}' does not exist.")
    scene = scene or slicer.mrmlScene
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name)
    storageNode = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storageNode)
    storageNode.SetFileName(str(path))
    segmentationNode.SetAndObserveStorageNodeID(storageNode.GetID())
    if not storageNode.ReadData(segmentationNode):
        scene.RemoveNode(segmentationNode)
        scene.RemoveNode(storageNode)
        raise InputError(f"segmentation '{path}' cannot be read.")
    return segmentationNode


def _removeWithStorage(scene, node):
    storageNode = node.GetStorageNode()
    displayNode = node.GetDisplayNode()
    scene.RemoveNode(node)
    for other in (storageNode, displayNode):
        if other is not None:
            scene.RemoveNode(other)


def sliceChangeFromSegmentations(original, editedSegmentationNode, segmentId, referenceVolumeNode, sliceIndex):
    """The change an edit made on slice `sliceIndex` (as in the scores: the axis closest to S-I):
    {dice, changed_voxels, original_voxels, edited_voxels}.

    `original`: a segmentation node, a .seg.nrrd path, or a (k, j, i) mask taken before editing
    (`segmentLabelmapArray`). Both are exported to labelmaps on the reference volume's grid; the segment
    is found by ID, then by name. A segment missing from the original counts as empty."""
    geometry, frame = sliceFrame(referenceVolumeNode)
    edited = segmentLabelmapArray(editedSegmentationNode, segmentId, referenceVolumeNode)
    editedName = (
        editedSegmentationNode.GetSegmentation()
        .GetSegment(_requireSegmentId(editedSegmentationNode, segmentId))
        .GetName()
    )
    if isinstance(original, np.ndarray):
        before = original != 0
        if before.shape != edited.shape:
            raise InputError(f"the original mask has shape {before.shape}, the volume {edited.shape}.")
    else:
        scene = _scene(editedSegmentationNode)
        originalNode = loadSegmentationFile(original, scene) if isinstance(original, (str, Path)) else original
        try:
            found = _segmentId(originalNode, segmentId) or _segmentId(originalNode, editedName)
            if found is None:
                before = np.zeros_like(edited)
            else:
                before = segmentLabelmapArray(originalNode, found, referenceVolumeNode)
        finally:
            if originalNode is not original:
                _removeWithStorage(scene, originalNode)
    return slice_change(before, edited, int(sliceIndex), frame)


# ----------------------------------------------------------------------------------------------------
# Versioned save


def saveEditedSegmentationVersion(segmentationNode, outputFolder, case, referenceVolumeNode=None):
    """Write the segmentation as the next `<case>_seg_v{N}.seg.nrrd` in `outputFolder` and return its path.

    An existing file is never replaced and the node's own storage node (the original file) is left alone:
    a separate storage node writes a temporary file that is then published under the next free number.
    With `referenceVolumeNode` (which becomes the segmentation's reference geometry), the labelmap is
    written on that volume's full grid (not cropped), so the file lines up voxel for voxel with the image
    for training. The path is also kept in the node's attribute AnomalyFlag.SavedVersion."""
    if segmentationNode is None:
        raise InputError("No segmentation node given to save.")
    outputFolder = Path(outputFolder)
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    scene = _scene(segmentationNode)

    def write(tmpPath):
        storageNode = slicer.vtkMRMLSegmentationStorageNode()
        scene.AddNode(storageNode)
        try:
            storageNode.SetFileName(str(tmpPath))
            storageNode.SetCropToMinimumExtent(referenceVolumeNode is None)
            storageNode.SetUseCompression(True)
            if not storageNode.WriteData(segmentationNode):
                raise SessionError(f"segmentation '{segmentationNode.GetName()}' could not be written.")
        finally:
            scene.RemoveNode(storageNode)

    path = write_new_version(outputFolder, case, write)
    segmentationNode.SetAttribute(ATTR_SAVED_VERSION, str(path))
    logging.info("AnomalyFlag: edited segmentation of %s saved as %s", case, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Decisions table


def decisionsToTableNode(session, tableNode=None, scene=None):
    """A table node with one row per queued slice, in review order: slice, score, decision, reviewer,
    time, note, dice, changed_voxels (empty / NaN while a slice is pending). `session` is a ReviewSession
    or sidecar content (`AnomalyFlagLib.review.load_sidecar`). Call again after each decision to keep
    the table in step with the sidecar; the same node is refilled."""
    data = session.data if hasattr(session, "data") and not isinstance(session, dict) else session
    if not isinstance(data, dict) or "queue" not in data:
        raise InputError("decisionsToTableNode needs a ReviewSession or review sidecar content.")
    scene = scene or (tableNode.GetScene() if tableNode is not None else None) or slicer.mrmlScene
    case = data.get("case", "")
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{case} review")
    decided = current_decisions(data)
    arrays = {}
    for column in DECISION_COLUMNS:
        if column == "slice":
            array = vtk.vtkIntArray()
        elif column in ("score", "dice", "changed_voxels"):
            array = vtk.vtkDoubleArray()
        else:
            array = vtk.vtkStringArray()
        array.SetName(column)
        arrays[column] = array
    for item in data["queue"]:
        record = decided.get(int(item["slice"])) or {}
        change = record.get("change") or {}
        score = item.get("normalised")
        arrays["slice"].InsertNextValue(int(item["slice"]))
        arrays["score"].InsertNextValue(float(score) if score is not None else math.nan)
        for column in ("decision", "reviewer", "time", "note"):
            arrays[column].InsertNextValue(str(record.get(column) or ""))
        arrays["dice"].InsertNextValue(float(change["dice"]) if "dice" in change else math.nan)
        voxels = change.get("changed_voxels")
        arrays["changed_voxels"].InsertNextValue(float(voxels) if voxels is not None else math.nan)
    table = vtk.vtkTable()
    for column in DECISION_COLUMNS:
        table.AddColumn(arrays[column])
    reviewed = sum(1 for item in data["queue"] if int(item["slice"]) in decided)
    wasModifying = tableNode.StartModify()
    try:
        tableNode.SetAndObserveTable(table)
        tableNode.SetUseColumnNameAsColumnHeader(True)
        for column, description in _COLUMN_INFO.items():
            tableNode.SetColumnDescription(column, description)
        tableNode.SetAttribute(ATTR_ROLE, "review")
        tableNode.SetAttribute(ATTR_CASE, case)
        tableNode.SetAttribute(ATTR_PROGRESS, f"{reviewed}/{len(data['queue'])}")
        sidecar = getattr(session, "sidecar_path", None)
        if sidecar is not None:
            tableNode.SetAttribute(ATTR_SIDECAR, str(sidecar))
    finally:
        tableNode.EndModify(wasModifying)
    return tableNode


# ----------------------------------------------------------------------------------------------------
# Recontouring


def recontourTarget(segmentationNode, segmentId, volumeNode, sliceIndex, heatmapNode=None):
    """What the GUI selects to recontour slice `sliceIndex`: node IDs, the segment, and the RAS point to
    centre the slice views on (the hottest heatmap region of that slice, or the slice centre)."""
    if segmentationNode is None or volumeNode is None:
        raise InputError("Recontouring needs a segmentation and its volume.")
    segmentId = _requireSegmentId(segmentationNode, segmentId)
    geometry, frame = sliceFrame(volumeNode)
    numSlices = geometry.size[frame.slice_ijk_axis]
    if not 0 <= int(sliceIndex) < numSlices:
        raise InputError(f"slice {sliceIndex} is outside volume '{volumeNode.GetName()}' (0-{numSlices - 1}).")
    return {
        "segmentationNodeID": segmentationNode.GetID(),
        "segmentID": segmentId,
        "segmentName": segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(),
        "sourceVolumeNodeID": volumeNode.GetID(),
        "sliceIndex": int(sliceIndex),
        "sliceRAS": hottestPointRAS(volumeNode, heatmapNode, int(sliceIndex)),
    }


def prepareSegmentEditorNode(target, segmentEditorNode=None, scene=None):
    """Point a vtkMRMLSegmentEditorNode at a `recontourTarget`: segmentation, source volume, selected
    segment. The module hands this node to its Segment Editor widget and jumps the views to sliceRAS."""
    scene = scene or slicer.mrmlScene
    if segmentEditorNode is None:
        segmentEditorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "AnomalyFlag segment editor")
    segmentationNode = scene.GetNodeByID(target["segmentationNodeID"])
    volumeNode = scene.GetNodeByID(target["sourceVolumeNodeID"])
    if segmentationNode is None or volumeNode is None:
        raise InputError("the segmentation or volume to recontour is no longer in the scene.")
    segmentEditorNode.SetAndObserveSegmentationNode(segmentationNode)
    if hasattr(segmentEditorNode, "SetAndObserveSourceVolumeNode"):
        segmentEditorNode.SetAndObserveSourceVolumeNode(volumeNode)
    else:  # Slicer before 5.4
        segmentEditorNode.SetAndObserveMasterVolumeNode(volumeNode)
    segmentEditorNode.SetSelectedSegmentID(target["segmentID"])
    return segmentEditorNode
