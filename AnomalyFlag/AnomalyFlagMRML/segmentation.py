"""Segmentation nodes: loading one from a file, finding a segment by ID or name, a region-of-interest mask on a
reference volume's voxel grid, and outline display."""

from pathlib import Path

import numpy as np
import slicer
from AnomalyFlagLib.errors import InputError
from vtk.util import numpy_support

from .scene import getScene, nodeIds, removeNodesAddedSince
from .volumes import copyVolumeGeometry, geometryFromVolumeNode, updateVolumeNodeFromArray

BINARY_LABELMAP = "Binary labelmap"


def segmentIdsOf(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def findSegmentId(segmentationNode, segment):
    """The ID of the segment whose ID or name is `segment`; None when there is none."""
    segmentation = segmentationNode.GetSegmentation()
    if segment and segmentation.GetSegment(segment) is not None:
        return segment
    return segmentation.GetSegmentIdBySegmentName(segment or "") or None


def requireSegmentId(segmentationNode, segment):
    """As findSegmentId, but InputError (listing the segments there are) when there is none."""
    found = findSegmentId(segmentationNode, segment)
    if found is not None:
        return found
    segmentation = segmentationNode.GetSegmentation()
    names = ", ".join(f"'{segmentation.GetSegment(s).GetName()}' ({s})" for s in segmentIdsOf(segmentationNode))
    raise InputError(
        f"segmentation '{segmentationNode.GetName()}' has no segment '{segment}'"
        f"{'; its segments are ' + names if names else ' (it has no segments)'}."
    )


def loadSegmentation(path, scene=None, name=None, referenceVolumeNode=None, geometry=None, keepStorageNode=True):
    """A segmentation node read from a .seg.nrrd, or made from a label map file (one segment per label value,
    on the grid of `referenceVolumeNode`, whose library `geometry` may be given). With `keepStorageNode` a
    .seg.nrrd keeps its storage node (saving the scene writes that file); without, the file stays unknown
    to the scene. On failure nothing is left in the scene."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation file '{path}' does not exist.")
    scene = getScene(scene)
    before = nodeIds(scene)
    try:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name)
        if path.name.lower().endswith(".seg.nrrd"):
            storageNode = slicer.vtkMRMLSegmentationStorageNode()
            scene.AddNode(storageNode)
            storageNode.SetFileName(str(path))
            if not storageNode.ReadData(segmentationNode):
                raise InputError(f"segmentation '{path}' cannot be read.")
            if keepStorageNode:
                segmentationNode.SetAndObserveStorageNodeID(storageNode.GetID())
            else:
                scene.RemoveNode(storageNode)
            return segmentationNode
        if referenceVolumeNode is None:
            raise InputError(f"label map '{path}' needs the volume it was drawn on.")
        import SimpleITK as sitk
        from AnomalyFlagLib.io.volumes import read_image
        from AnomalyFlagLib.roi import roi_on_image_grid

        geometry = geometry or geometryFromVolumeNode(referenceVolumeNode)
        image = read_image(path, f"segmentation '{path}'")
        labels = sitk.GetArrayFromImage(image)
        mask = roi_on_image_grid(image, geometry, name=f"segmentation '{path}'", allow_empty=True)
        labels = labels if labels.shape == mask.shape else mask.astype(np.uint8)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{path.name} labels")
        updateVolumeNodeFromArray(labelmap, np.where(mask, labels, 0).astype(np.int16), geometry)
        copyVolumeGeometry(referenceVolumeNode, labelmap)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise InputError(f"label map '{path}' cannot be turned into a segmentation.")
        return segmentationNode
    except BaseException:
        removeNodesAddedSince(scene, before)
        raise


def _orientedToArray(image) -> np.ndarray:
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(dims) < 1:
        return np.zeros((0, 0, 0), dtype=bool)
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0])


def roiMaskFromSegmentation(segmentationNode, segmentIds, referenceVolumeNode) -> np.ndarray:
    """Boolean (k, j, i) mask of the union of `segmentIds` (IDs or names; None or empty: all segments),
    resampled (nearest neighbour, parent transforms applied) onto the reference volume's voxel grid.

    Raises InputError naming the segment when it is missing, empty, or does not overlap the volume.
    """
    if segmentationNode is None:
        raise InputError("No segmentation node given for the region of interest.")
    if referenceVolumeNode is None or referenceVolumeNode.GetImageData() is None:
        raise InputError("No reference volume (with image data) given for the region of interest.")
    segLabel = f"segmentation '{segmentationNode.GetName()}'"
    ids = list(segmentIds) if segmentIds else segmentIdsOf(segmentationNode)
    if not ids:
        raise InputError(f"{segLabel} has no segments; nothing to restrict scoring to.")
    ids = [requireSegmentId(segmentationNode, s) for s in ids]
    segmentation = segmentationNode.GetSegmentation()
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        if not segmentation.CreateRepresentation(BINARY_LABELMAP):
            raise InputError(f"{segLabel} cannot be converted to a binary labelmap.")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    reference = logic.CreateOrientedImageDataFromVolumeNode(referenceVolumeNode)
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
    for segmentId in ids:
        name = f"segment '{segmentation.GetSegment(segmentId).GetName()}' of {segLabel}"
        own = slicer.vtkOrientedImageData()
        if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, own, True):
            raise InputError(f"{name} has no binary labelmap to use as a region of interest.")
        label = segmentation.GetSegment(segmentId).GetLabelValue()  # segments may share one labelmap layer
        ownArray = _orientedToArray(own)
        if ownArray.size == 0 or not (ownArray == label).any():
            raise InputError(f"{name} is empty; nothing to restrict scoring to.")
        resampled = slicer.vtkOrientedImageData()
        ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            own, reference, resampled, False, False
        )
        array = _orientedToArray(resampled) if ok else None
        if array is None or array.shape != mask.shape:
            raise InputError(f"{name} cannot be mapped onto the grid of volume '{referenceVolumeNode.GetName()}'.")
        inside = array == label
        if not inside.any():
            raise InputError(
                f"{name} does not overlap volume '{referenceVolumeNode.GetName()}' "
                "(it lies outside the volume's field of view; was it drawn on another scan?)."
            )
        mask |= inside
    return mask


def showSegmentationOutlines(segmentationNode, thickness=2, opacity=1.0):
    """Show the segmentation in slice views as outlines only (2D fill hidden), `thickness` pixels wide."""
    if segmentationNode is None:
        return None
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is None:
        segmentationNode.CreateDefaultDisplayNodes()
        displayNode = segmentationNode.GetDisplayNode()
    wasModifying = displayNode.StartModify()
    try:
        displayNode.SetVisibility(True)
        displayNode.SetVisibility2DOutline(True)
        displayNode.SetVisibility2DFill(False)
        displayNode.SetOpacity2DOutline(float(opacity))
        displayNode.SetSliceIntersectionThickness(int(thickness))
    finally:
        displayNode.EndModify(wasModifying)
    return displayNode


def segmentColors(segmentationNode):
    """{segment ID: (r, g, b)} of the segmentation's segments."""
    segmentation = segmentationNode.GetSegmentation()
    return {s: tuple(segmentation.GetSegment(s).GetColor()) for s in segmentIdsOf(segmentationNode)}
