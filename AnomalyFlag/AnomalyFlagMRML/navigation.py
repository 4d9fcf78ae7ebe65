"""Going to a flagged slice: the hottest point of a heatmap slice, and moving the slice views there.

Slice indices are voxel indices along the volume's axis closest to superior-inferior, as in the library
(AnomalyFlagLib.orientation.AxialFrame), whatever the volume's orientation.
"""

import numpy as np
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.orientation import AxialFrame
from vtk.util import numpy_support

from .scene import getScene
from .volumes import geometryFromVolumeNode, ijkToRASArray


def sliceFrame(volumeNode):
    """(Geometry, AxialFrame) of a volume node."""
    geometry = geometryFromVolumeNode(volumeNode)
    return geometry, AxialFrame.from_geometry(geometry)


def planeToIJK(frame: AxialFrame, shape_kji, sliceIndex, rows, columns) -> np.ndarray:
    """(n, 3) continuous (i, j, k) voxel indices of points (row, column) of oriented slice `sliceIndex`."""
    shape_t = [shape_kji[a] for a in frame.order]
    rows = np.asarray(rows, dtype=float)
    columns = np.asarray(columns, dtype=float)
    r = (shape_t[1] - 1) - rows if frame.flip_rows else rows
    c = (shape_t[2] - 1) - columns if frame.flip_columns else columns
    kji = np.zeros((len(rows), 3))
    kji[:, frame.order[0]] = sliceIndex
    kji[:, frame.order[1]] = r
    kji[:, frame.order[2]] = c
    return kji[:, ::-1]


def _toWorld(volumeNode, ijkToRAS, ijk) -> tuple:
    ras = (ijkToRAS @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        ras = np.asarray(transformNode.GetTransformToWorld().TransformPoint(*ras))
    return tuple(float(v) for v in ras)


def _connectedRegion(mask: np.ndarray, seed) -> np.ndarray:
    """4-connected component of a 2D mask containing `seed` (numpy only)."""
    region = np.zeros_like(mask)
    region[seed] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _heatmapSlice(heatmapNode, frame, shape_kji, sliceIndex):
    if heatmapNode is None or heatmapNode.GetImageData() is None:
        return None
    image = heatmapNode.GetImageData()
    dims = image.GetDimensions()
    if tuple(dims[::-1]) != tuple(shape_kji):
        raise InputError(
            f"heatmap '{heatmapNode.GetName()}' has size {dims}, the volume {tuple(shape_kji[::-1])}; "
            "it belongs to another volume."
        )
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape_kji)
    return np.asarray(frame.view(array)[sliceIndex])


def hottestPointRAS(volumeNode, heatmapNode, sliceIndex, fraction=0.5):
    """World (RAS) position of the centroid of the hottest region on slice `sliceIndex` of the heatmap
    (the connected pixels at or above `fraction` of the slice maximum around the maximum), or the slice
    centre when that slice of the heatmap is all zero (or no heatmap is given)."""
    if volumeNode is None:
        raise InputError("No volume given to navigate in.")
    geometry, frame = sliceFrame(volumeNode)
    shape_kji = geometry.size[::-1]
    numSlices = geometry.size[frame.slice_ijk_axis]
    if not 0 <= int(sliceIndex) < numSlices:
        raise InputError(f"slice {sliceIndex} is outside volume '{volumeNode.GetName()}' (0-{numSlices - 1}).")
    sliceIndex = int(sliceIndex)
    plane = _heatmapSlice(heatmapNode, frame, shape_kji, sliceIndex)
    if plane is not None and plane.max() > 0:
        seed = np.unravel_index(int(np.argmax(plane)), plane.shape)
        region = _connectedRegion(plane >= max(1, fraction * float(plane.max())), seed)
        rows, columns = np.nonzero(region)
        weights = plane[rows, columns].astype(float)
        row, column = np.average(rows, weights=weights), np.average(columns, weights=weights)
    else:
        rows_n, columns_n = (shape_kji[a] for a in frame.order[1:])
        row, column = (rows_n - 1) / 2.0, (columns_n - 1) / 2.0
    ijk = planeToIJK(frame, shape_kji, sliceIndex, [row], [column])[0]
    return _toWorld(volumeNode, ijkToRASArray(volumeNode), ijk)


def jumpToPoint(point, scene=None, sliceNodes=None, centered=True):
    """Move slice views (default: every slice node of the scene) to the RAS `point`: centred on it
    (`centered`), or only offset through it. Returns the point."""
    if sliceNodes is None:
        collection = getScene(scene).GetNodesByClass("vtkMRMLSliceNode")
        sliceNodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    for sliceNode in sliceNodes:
        if centered:
            sliceNode.JumpSliceByCentering(*point)
        else:
            sliceNode.JumpSliceByOffsetting(*point)
    return tuple(point)


def jumpToSlice(volumeNode, heatmapNode, sliceIndex, sliceNodes=None, centered=True):
    """Move slice views (default: every slice node of the scene) to the hottest point of slice `sliceIndex`
    (see jumpToPoint). Returns the RAS point."""
    point = hottestPointRAS(volumeNode, heatmapNode, sliceIndex)
    return jumpToPoint(point, volumeNode.GetScene(), sliceNodes, centered)
