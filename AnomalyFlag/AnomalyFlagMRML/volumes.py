"""Scalar volume nodes <-> (k, j, i) numpy arrays with the library's LPS Geometry.

MRML stores IJK-to-RAS; the library (like ITK) uses LPS. RAS -> LPS flips the sign of the first two
world axes, so the LPS IJK-to-physical matrix is the RAS one with its first two rows negated: exact for
any direction matrix (oblique, flipped, left-handed).
"""

import logging

import numpy as np
import vtk
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.volumes import validate_volume_array
from vtk.util import numpy_support

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def arrayFromVTKMatrix(matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkMatrixFromArray(array) -> vtk.vtkMatrix4x4:
    """A 4x4 array as a new vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def ijkToRASArray(volumeNode) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return arrayFromVTKMatrix(matrix)


def ijkToRASFromGeometry(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a library (LPS) geometry."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = geometry.direction_matrix @ np.diag(geometry.spacing)
    ijk_to_lps[:3, 3] = geometry.origin
    return RAS_TO_LPS @ ijk_to_lps


def _nodeName(volumeNode, name=None) -> str:
    if name:
        return name
    return f"volume '{volumeNode.GetName()}'" if volumeNode is not None else "volume"


def _checkedImageData(volumeNode, name=None):
    if volumeNode is None:
        raise InputError("No input volume is selected; choose a CT volume to score.")
    label = _nodeName(volumeNode, name)
    if not volumeNode.IsA("vtkMRMLVolumeNode"):
        raise InputError(f"{label} is a {volumeNode.GetClassName()}, not a volume.")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData() is None or imageData.GetPointData().GetScalars() is None:
        raise InputError(f"{label} holds no image data (was it loaded completely?).")
    components = imageData.GetNumberOfScalarComponents()
    if components != 1 or volumeNode.IsA("vtkMRMLVectorVolumeNode") or volumeNode.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(
            f"{label} has {components} components per voxel (a colour, vector, tensor or 4D volume); "
            "a scalar 3D volume such as a CT is needed."
        )
    dims = imageData.GetDimensions()
    if min(dims) < 1 or int(np.prod(dims)) == 0:
        raise InputError(f"{label} is empty (size {dims[0]}x{dims[1]}x{dims[2]}).")
    if dims[2] == 1 or dims[1] == 1 or dims[0] == 1:
        raise InputError(
            f"{label} is 2D (size {dims[0]}x{dims[1]}x{dims[2]}); a 3D volume with several slices is needed."
        )
    return imageData, label


def geometryFromVolumeNode(volumeNode) -> Geometry:
    """Library (LPS) geometry of a volume node: size, spacing, origin and direction from IJK-to-RAS."""
    if volumeNode is None:
        raise InputError("No volume node given.")
    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise InputError(f"{_nodeName(volumeNode)} holds no image data.")
    ijk_to_lps = RAS_TO_LPS @ ijkToRASArray(volumeNode)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{_nodeName(volumeNode)} has a zero voxel spacing.")
    direction = axes / spacing
    return Geometry(
        size=tuple(int(d) for d in imageData.GetDimensions()),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in ijk_to_lps[:3, 3]),
        direction=tuple(float(d) for d in direction.ravel()),
    )


def arrayAndGeometryFromVolumeNode(volumeNode, name=None):
    """(k, j, i) numpy array (a copy, safe to use from a worker thread) and LPS Geometry of a scalar volume.

    Raises InputError for no node, no image data, multi-component (vector/colour/4D) volumes, 2D volumes
    (any dimension of size 1), and NaN or constant volumes.
    """
    imageData, label = _checkedImageData(volumeNode, name)
    if volumeNode.GetParentTransformNode() is not None:
        logging.warning(
            "AnomalyFlag: %s is under transform '%s'; it is scored on its own voxel grid and the heatmap is "
            "placed under the same transform.",
            label,
            volumeNode.GetParentTransformNode().GetName(),
        )
    dims = imageData.GetDimensions()
    scalars = imageData.GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()
    validate_volume_array(array, label)
    return array, geometryFromVolumeNode(volumeNode)


def copyVolumeGeometry(sourceNode, targetNode):
    """Give `targetNode` the voxel-to-RAS geometry of `sourceNode` bit for bit (MRML keeps spacing, origin
    and axis directions separately; copying them avoids a matrix decomposition round trip)."""
    directions = vtk.vtkMatrix4x4()
    sourceNode.GetIJKToRASDirectionMatrix(directions)
    wasModifying = targetNode.StartModify()
    try:
        targetNode.SetSpacing(sourceNode.GetSpacing())
        targetNode.SetOrigin(sourceNode.GetOrigin())
        # MRML ignores a direction change within its tolerance, so go through a clearly different value
        targetNode.SetIJKToRASDirectionMatrix(vtk.vtkMatrix4x4())
        flipped = vtk.vtkMatrix4x4()
        flipped.SetElement(0, 0, -1.0)
        targetNode.SetIJKToRASDirectionMatrix(flipped)
        targetNode.SetIJKToRASDirectionMatrix(directions)
    finally:
        targetNode.EndModify(wasModifying)
    return targetNode


def updateVolumeNodeFromArray(volumeNode, array, geometry: Geometry, ijkToRAS=None):
    """Set a scalar volume node's voxels from a (k, j, i) array and its IJK-to-RAS from `geometry`
    (or from the 4x4 `ijkToRAS` given)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise InputError(f"a 3D (k, j, i) array is needed, not shape {array.shape}.")
    if tuple(array.shape[::-1]) != tuple(geometry.size):
        raise InputError(f"array shape {array.shape} does not match geometry size {geometry.size} (i, j, k).")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    vtkArray.SetName("ImageScalars")
    imageData.GetPointData().SetScalars(vtkArray)
    matrix = ijkToRASFromGeometry(geometry) if ijkToRAS is None else np.asarray(ijkToRAS, dtype=float)
    wasModifying = volumeNode.StartModify()
    try:
        volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(matrix))
        volumeNode.SetAndObserveImageData(imageData)
    finally:
        volumeNode.EndModify(wasModifying)
    return volumeNode
