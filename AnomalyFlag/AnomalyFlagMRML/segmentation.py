"""Segmentation nodes: a region-of-interest mask on a reference volume's voxel grid, and outline display."""

import numpy as np
import slicer
from AnomalyFlagLib.errors import InputError
from vtk.util import numpy_support

BINARY_LABELMAP = "Binary labelmap"


def segmentIdsOf(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _resolveSegmentId(segmentationNode, segmentId):
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetSegment(segmentId) is not None:
        return segmentId
    byName = segmentation.GetSegmentIdBySegmentName(segmentId)
    if byName:
        return byName
    names = ", ".join(f"'{segmentation.GetSegment(s).GetName()}' ({s})" for s in segmentIdsOf(segmentationNode))
    raise InputError(
        f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'"
        f"{'; its segments are ' + names if names else ' (it has no segments)'}."
    )


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
    ids = [_resolveSegmentId(segmentationNode, s) for s in ids]
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
