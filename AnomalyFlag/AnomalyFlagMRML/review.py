"""Review in the scene: versioned saves of edited segmentations, the change an edit made on a slice,
the decisions as a table node kept in step with the session sidecar, and what the Segment Editor must
select to recontour a flagged slice.

Slicer + vtk only (no Qt). The review session itself is AnomalyFlagLib.review.session.ReviewSession; this module
turns nodes into what it needs. The original segmentation file is never written: every save goes to a new
`<case>_seg_v{N}.seg.nrrd` (AnomalyFlagLib.review.label_versions).
"""

import logging
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.geometry import Geometry, require_same_geometry
from AnomalyFlagLib.io.volumes import case_name, read_image
from AnomalyFlagLib.review.label_versions import latest_version, write_new_version
from AnomalyFlagLib.review.session import current_decisions, image_fingerprint_of, slice_change
from vtk.util import numpy_support

from .constants import (
    ATTR_CASE,
    ATTR_PROGRESS,
    ATTR_ROLE,
    ATTR_SAVED_VERSION,
    ATTR_SCALE,
    ATTR_SIDECAR,
    HEATMAP_SCALE_KEY,
    ROLE_HEATMAP,
    ROLE_REVIEW,
)
from .heatmap import showHeatmap
from .navigation import hottestPointRAS, sliceFrame
from .scene import getScene, nodeIds, removeNodesAddedSince
from .segmentation import BINARY_LABELMAP, findSegmentId, loadSegmentation, requireSegmentId, showSegmentationOutlines
from .volumes import (
    arrayAndGeometryFromVolumeNode,
    arrayFromVTKMatrix,
    copyVolumeGeometry,
    ijkToRASArray,
    updateVolumeNodeFromArray,
)

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


# ----------------------------------------------------------------------------------------------------
# Segments as arrays on the reference grid


def segmentLabelmapArray(segmentationNode, segmentId, referenceVolumeNode) -> np.ndarray:
    """Boolean (k, j, i) mask of one segment exported to a labelmap on the reference volume's grid
    (an empty segment gives an all-false mask)."""
    if referenceVolumeNode is None or referenceVolumeNode.GetImageData() is None:
        raise InputError("No reference volume (with image data) given for the segmentation.")
    segmentId = requireSegmentId(segmentationNode, segmentId)
    scene = getScene(node=segmentationNode)
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
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        if tuple(image.GetDimensions()) != tuple(dims):
            raise InputError(f"segment '{segmentId}' was exported with size {image.GetDimensions()}, not {dims}.")
        return array.reshape(dims[::-1]) != 0
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        if displayNode is not None:
            scene.RemoveNode(displayNode)
        scene.RemoveNode(labelmapNode)


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
        .GetSegment(requireSegmentId(editedSegmentationNode, segmentId))
        .GetName()
    )
    if isinstance(original, np.ndarray):
        before = original != 0
        if before.shape != edited.shape:
            raise InputError(f"the original mask has shape {before.shape}, the volume {edited.shape}.")
    else:
        scene = getScene(node=editedSegmentationNode)
        existing = nodeIds(scene)
        try:
            originalNode = original
            if isinstance(original, (str, Path)):
                originalNode = loadSegmentation(original, scene, referenceVolumeNode=referenceVolumeNode,
                                                keepStorageNode=False)  # fmt: skip
            found = findSegmentId(originalNode, segmentId) or findSegmentId(originalNode, editedName)
            if found is None:
                before = np.zeros_like(edited)
            else:
                before = segmentLabelmapArray(originalNode, found, referenceVolumeNode)
        finally:
            removeNodesAddedSince(scene, existing)
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
    scene = getScene(node=segmentationNode)

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
    or sidecar content (`AnomalyFlagLib.review.session.load_sidecar`). Call again after each decision to keep
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
        tableNode.SetAttribute(ATTR_ROLE, ROLE_REVIEW)
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
    segmentId = requireSegmentId(segmentationNode, segmentId)
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


# ----------------------------------------------------------------------------------------------------
# Checks and loading for the module's review loop


def imageFingerprintOfVolumeNode(volumeNode) -> str:
    """Content fingerprint of a volume node (grid + voxel bytes), equal to the library's
    `image_fingerprint_of(path)` for the file it was read from."""
    array, geometry = arrayAndGeometryFromVolumeNode(volumeNode)
    return image_fingerprint_of(array, geometry)


def requireSegmentationOnVolumeGrid(segmentationNode, volumeNode, segmentIds=None, tolerance=1e-3):
    """Raise InputError unless the segments' binary labelmaps lie on the volume's voxel lattice (same
    spacing and axes, origin a whole number of voxels away) and their voxels inside the volume.

    A segment stored cropped to its extent (as Slicer does) passes; one drawn on another scan, or
    resampled onto another grid, does not. Segments whose source is not a binary labelmap (closed
    surfaces) have no grid of their own and are rasterised onto the volume's grid, so they pass."""
    if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError("A segmentation and a volume with image data are needed.")
    segmentation = segmentationNode.GetSegmentation()
    sourceName = (
        segmentation.GetSourceRepresentationName()
        if hasattr(segmentation, "GetSourceRepresentationName")
        else segmentation.GetMasterRepresentationName()
    )
    if sourceName != BINARY_LABELMAP:
        return
    label = f"segmentation '{segmentationNode.GetName()}'"
    volumeLabel = f"volume '{volumeNode.GetName()}'"
    if (segmentationNode.GetTransformNodeID() or "") != (volumeNode.GetTransformNodeID() or ""):
        raise InputError(f"{label} and {volumeLabel} are under different transforms; they do not line up.")
    volumeToRAS = ijkToRASArray(volumeNode)
    rasToVolume = np.linalg.inv(volumeToRAS)
    dims = np.asarray(volumeNode.GetImageData().GetDimensions())
    ids = [requireSegmentId(segmentationNode, s) for s in segmentIds] if segmentIds else [
        segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
    ]  # fmt: skip
    for segmentId in ids:
        image = segmentation.GetSegment(segmentId).GetRepresentation(BINARY_LABELMAP)
        if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            continue
        extent = image.GetExtent()
        if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
            continue  # empty segment
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        segmentToRAS = arrayFromVTKMatrix(matrix)
        segmentToVolume = rasToVolume @ segmentToRAS
        name = f"segment '{segmentation.GetSegment(segmentId).GetName()}' of {label}"
        if not np.allclose(segmentToVolume[:3, :3], np.eye(3), atol=tolerance):
            spacing = ", ".join(f"{s:.4g}" for s in np.linalg.norm(segmentToRAS[:3, :3], axis=0))
            raise InputError(
                f"{name} is on another voxel grid than {volumeLabel} (spacing {spacing} mm or axes differ); it "
                "does not belong to this image. Load the segmentation made on this scan."
            )
        offset = segmentToVolume[:3, 3]
        if not np.allclose(offset, np.round(offset), atol=tolerance):
            raise InputError(
                f"{name} is shifted by a fraction of a voxel against {volumeLabel}; it does not belong to this "
                "image. Load the segmentation made on this scan."
            )
        scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        value = segmentation.GetSegment(segmentId).GetLabelValue()
        inside = scalars.reshape(shape) == value
        if not inside.any():
            continue
        k, j, i = (np.flatnonzero(inside.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        low = np.round(offset).astype(int) + np.array([extent[0] + i[0], extent[2] + j[0], extent[4] + k[0]])
        high = np.round(offset).astype(int) + np.array([extent[0] + i[-1], extent[2] + j[-1], extent[4] + k[-1]])
        if (low < 0).any() or (high >= dims).any():
            raise InputError(
                f"{name} reaches outside {volumeLabel} (voxels {tuple(low)}-{tuple(high)}, the volume has "
                f"{tuple(int(d) for d in dims)}); it does not belong to this image."
            )


def findOriginalSegmentation(imagePath, case):
    """The automatic segmentation stored next to a case's image: <case>.seg.nrrd, <case>_seg.* or
    <case>_organs.* in the image's folder (not the image itself); None when there is none."""
    if not imagePath:
        return None
    imagePath = Path(imagePath)
    folder = imagePath if imagePath.is_dir() else imagePath.parent
    if not folder.is_dir():
        return None
    wanted = (f"{case}.seg", f"{case}_seg", f"{case}_organs")
    for name in wanted:
        for candidate in sorted(folder.iterdir()):
            if candidate.is_file() and candidate != imagePath and case_name(candidate) == name:
                return candidate
    return None


def loadReviewCase(outputFolder, case, imagePath, segmentationPath=None, scene=None):
    """Load a scored case for review: its image as a scalar volume node (read as the scoring read it),
    the heatmap `<case>_heatmap.nrrd` of `outputFolder` over it, and the segmentation to edit, shown as
    outlines. The segmentation to edit is the newest saved version `<case>_seg_v{N}.seg.nrrd` when there
    is one (earlier edits are kept), else `segmentationPath` (a .seg.nrrd or label map); the original is
    then also loaded (hidden) as the reference for the change measure.

    Returns dict(volume, heatmap, segmentation, originalSegmentation, segmentationPath, nodeIDs): nodeIDs
    are every node added, for `removeReviewCase`. On failure nothing stays in the scene."""
    scene = scene or slicer.mrmlScene
    outputFolder = Path(outputFolder)
    if not imagePath:
        raise InputError(
            f"the image of case '{case}' is not recorded in the worklist or its summary; score it again or "
            "give the image path."
        )
    before = nodeIds(scene)
    try:
        image = read_image(imagePath, f"image of case '{case}'")
        geometry = Geometry.from_image(image)
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case)
        updateVolumeNodeFromArray(volume, sitk.GetArrayViewFromImage(image), geometry)
        volume.CreateDefaultDisplayNodes()
        volume.SetAttribute(ATTR_CASE, case)
        del image
        heatmap = None
        heatmapPath = outputFolder / f"{case}_heatmap.nrrd"
        if heatmapPath.is_file():
            heatImage = read_image(heatmapPath, f"heatmap of case '{case}'")
            require_same_geometry(geometry, Geometry.from_image(heatImage), f"image '{imagePath}'", f"'{heatmapPath}'")
            heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case} anomaly heatmap")
            updateVolumeNodeFromArray(heatmap, sitk.GetArrayViewFromImage(heatImage).astype(np.uint8), geometry)
            copyVolumeGeometry(volume, heatmap)
            scale = heatImage.GetMetaData(HEATMAP_SCALE_KEY) if heatImage.HasMetaDataKey(HEATMAP_SCALE_KEY) else ""
            if scale:
                heatmap.SetAttribute(ATTR_SCALE, scale)
            heatmap.SetAttribute(ATTR_ROLE, ROLE_HEATMAP)
            heatmap.SetAttribute(ATTR_CASE, case)
            showHeatmap(heatmap, volume)
        segmentation = original = None
        latest = latest_version(outputFolder, case)
        if segmentationPath:
            original = loadSegmentation(segmentationPath, scene, f"{case} original segmentation", volume, geometry,
                                        keepStorageNode=False)  # fmt: skip
        if latest is not None:
            segmentation = loadSegmentation(latest, scene, f"{case} segmentation ({latest.name})")
            if original is not None:
                original.CreateDefaultDisplayNodes()
                original.GetDisplayNode().SetVisibility(False)
        else:
            segmentation, original = original, None
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            requireSegmentationOnVolumeGrid(segmentation, volume)
            showSegmentationOutlines(segmentation)
    except BaseException:
        removeNodesAddedSince(scene, before)
        raise
    return {
        "volume": volume,
        "heatmap": heatmap,
        "segmentation": segmentation,
        "originalSegmentation": original,
        "segmentationPath": str(segmentationPath) if segmentationPath else None,
        "nodeIDs": sorted(
            i for i in nodeIds(scene) - before if not scene.GetNodeByID(i).IsA("vtkMRMLColorNode")
        ),  # the shared heatmap colour table stays
    }


def removeReviewCase(loaded, scene=None):
    """Remove the nodes `loadReviewCase` added (those still in the scene)."""
    scene = scene or slicer.mrmlScene
    for nodeID in loaded.get("nodeIDs", []):
        node = scene.GetNodeByID(nodeID)
        if node is not None:
            scene.RemoveNode(node)
