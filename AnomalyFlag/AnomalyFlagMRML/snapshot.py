"""PNG snapshot of one scored slice: CT, heatmap overlay and segmentation outlines, with a caption.

The CT and the heatmap are composited by Slicer's own slice pipeline (vtkMRMLSliceLogic and its layer
logics: reslicing, window/level, colour table, threshold, foreground opacity), in a private scene that
shares the voxel buffers with the caller's nodes, so the caller's scene and views are not touched. The
slice plane is the volume's own slice `sliceIndex` (along its axis closest to superior-inferior), shown
the radiological way: patient right on the image's left, anterior at the top. Segment outlines are cut
from each segment's labelmap on the same plane; the caption is drawn with FreeType. No OpenGL context
is needed, so this runs headless on any machine.
"""

import logging
import os

import numpy as np
import slicer
import vtk
from AnomalyFlagLib.errors import InputError
from vtk.util import numpy_support

from .constants import ATTR_CASE, ATTR_SCALE
from .heatmap import configureHeatmapDisplay
from .navigation import sliceFrame
from .segmentation import segmentIdsOf
from .volumes import arrayFromVTKMatrix, ijkToRASArray, vtkMatrixFromArray

CT_WINDOW = (400.0, 40.0)
"""Soft-tissue window (width, level) in HU used when the volume has no usable display window."""


def _worldIJKToRAS(volumeNode) -> np.ndarray:
    """IJK-to-world matrix (parent linear transforms applied)."""
    matrix = ijkToRASArray(volumeNode)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        toWorld = vtk.vtkMatrix4x4()
        if transformNode.GetMatrixTransformToWorld(toWorld):
            matrix = arrayFromVTKMatrix(toWorld) @ matrix
        else:
            logging.warning("AnomalyFlag snapshot: non-linear transform on '%s' ignored.", volumeNode.GetName())
    return matrix


def slicePlane(volumeNode, sliceIndex):
    """SliceToRAS (4x4) of the volume's slice `sliceIndex` and its in-plane extent (width, height) in mm."""
    geometry, frame = sliceFrame(volumeNode)
    ijkToRAS = _worldIJKToRAS(volumeNode)
    axes = ijkToRAS[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    directions = axes / spacing
    sliceAxis = frame.slice_ijk_axis
    rowAxis, columnAxis = 2 - frame.order[1], 2 - frame.order[2]
    x = directions[:, columnAxis] * (-1.0 if directions[0, columnAxis] > 0 else 1.0)  # towards patient left
    y = directions[:, rowAxis] * (1.0 if directions[1, rowAxis] >= 0 else -1.0)  # towards anterior
    n = directions[:, sliceAxis] * (1.0 if directions[2, sliceAxis] >= 0 else -1.0)  # towards superior
    centre = (np.asarray(geometry.size, dtype=float) - 1.0) / 2.0
    centre[sliceAxis] = sliceIndex
    sliceToRAS = np.eye(4)
    sliceToRAS[:3, 0], sliceToRAS[:3, 1], sliceToRAS[:3, 2] = x, y, n
    sliceToRAS[:3, 3] = (ijkToRAS @ np.append(centre, 1.0))[:3]
    width = geometry.size[columnAxis] * spacing[columnAxis]
    height = geometry.size[rowAxis] * spacing[rowAxis]
    return sliceToRAS, (float(width), float(height))


def _shadowVolume(scene, source, name, className="vtkMRMLScalarVolumeNode"):
    """A node in `scene` sharing `source`'s voxel buffer, placed at its world position."""
    node = scene.AddNewNodeByClass(className, name)
    node.SetAndObserveImageData(source.GetImageData())
    node.SetIJKToRASMatrix(vtkMatrixFromArray(_worldIJKToRAS(source)))
    return node


def _greyColorNode(scene):
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToGrey()
    node.SetName("Grey")
    scene.AddNode(node)
    return node


def _ctWindow(volumeNode, window):
    """(width, level): the one given; else the display node's when the user set it (auto window/level off);
    else a soft-tissue window for CT (Hounsfield units); else the display node's automatic one; else the
    1-99th percentiles."""
    if window is not None:
        return float(window[0]), float(window[1])
    display = volumeNode.GetDisplayNode()
    scalarDisplay = display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode")
    if scalarDisplay and not display.GetAutoWindowLevel() and display.GetWindow() > 0:
        return float(display.GetWindow()), float(display.GetLevel())
    scalars = numpy_support.vtk_to_numpy(volumeNode.GetImageData().GetPointData().GetScalars())
    sample = scalars[:: max(1, scalars.size // 200000)]
    if sample.min() <= -500 and sample.max() >= 0:  # Hounsfield units
        return CT_WINDOW
    if scalarDisplay and display.GetWindow() > 0:
        return float(display.GetWindow()), float(display.GetLevel())
    lo, hi = np.percentile(sample, [1, 99])
    return float(max(hi - lo, 1e-6)), float((hi + lo) / 2.0)


def _segmentMaskOnPlane(segmentationNode, segmentId, xyToRAS, size):
    """Boolean (size, size) mask of a segment on the slice plane (rows from the bottom, VTK order)."""
    oriented = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, oriented, True):
        return None
    dims = oriented.GetDimensions()
    scalars = oriented.GetPointData().GetScalars()
    if scalars is None or min(dims) < 1:
        return None
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    binary = (numpy_support.vtk_to_numpy(scalars) == label).astype(np.float32)
    if not binary.any():
        return None
    extent = oriented.GetExtent()
    imageToWorld = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(imageToWorld)
    plain = vtk.vtkImageData()
    plain.SetExtent(extent)
    plain.SetOrigin(0.0, 0.0, 0.0)
    plain.SetSpacing(1.0, 1.0, 1.0)
    plain.GetPointData().SetScalars(numpy_support.numpy_to_vtk(binary, deep=True))
    resliceAxes = np.linalg.inv(arrayFromVTKMatrix(imageToWorld)) @ xyToRAS
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(plain)
    reslice.SetResliceAxes(vtkMatrixFromArray(resliceAxes))
    reslice.SetInterpolationModeToLinear()
    reslice.SetOutputExtent(0, size - 1, 0, size - 1, 0, 0)
    reslice.SetOutputOrigin(0.0, 0.0, 0.0)
    reslice.SetOutputSpacing(1.0, 1.0, 1.0)
    reslice.SetBackgroundLevel(0.0)
    reslice.Update()
    out = numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars())
    return out.reshape(size, size) >= 0.5


def _shift(mask, dy, dx):
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _grow(mask, steps, fn):
    out = mask.copy()
    for _ in range(steps):
        nxt = out.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nxt = fn(nxt, _shift(out, dy, dx))
        out = nxt
    return out


def outlineOf(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels within about thickness/2 of the mask's boundary (centred on it, as Slicer draws outlines)."""
    outer, inner = thickness // 2, thickness - thickness // 2
    dilated = _grow(mask, outer, np.logical_or)
    eroded = _grow(mask, inner, np.logical_and)
    return dilated & ~eroded


def _caption(text, height):
    """RGBA uint8 (h, w, 4) image of `text` (rows from the bottom)."""
    import vtkmodules.vtkRenderingFreeType  # noqa: F401 - registers the FreeType text renderer

    renderer = vtk.vtkTextRenderer()
    prop = vtk.vtkTextProperty()
    prop.SetFontFamilyToArial()
    prop.SetFontSize(max(8, int(height)))
    prop.SetColor(1.0, 1.0, 1.0)
    prop.SetBackgroundColor(0.0, 0.0, 0.0)
    prop.SetBackgroundOpacity(0.55)
    prop.SetFrame(False)
    image = vtk.vtkImageData()
    dims = [0, 0]
    if not renderer.RenderString(prop, text, image, dims, 72):
        return None
    w, h, _ = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
    return array[: dims[1], : dims[0]]


def _blend(target, overlay, y0, x0):
    h = min(overlay.shape[0], target.shape[0] - y0)
    w = min(overlay.shape[1], target.shape[1] - x0)
    if h <= 0 or w <= 0:
        return
    over = overlay[:h, :w].astype(np.float32)
    alpha = over[..., 3:4] / 255.0
    region = target[y0 : y0 + h, x0 : x0 + w, :3].astype(np.float32)
    target[y0 : y0 + h, x0 : x0 + w, :3] = np.round(region * (1 - alpha) + over[..., :3] * alpha).astype(np.uint8)


def composeSlice(volumeNode, heatmapNode, sliceIndex, size=512, opacity=0.5, lowerThreshold=None, window=None):
    """RGB uint8 (size, size, 3) image (rows from the bottom, VTK order) of slice `sliceIndex` composited by
    Slicer's slice logic, and the XY-to-RAS matrix of its pixels."""
    sliceToRAS, (width, height) = slicePlane(volumeNode, sliceIndex)
    scene = slicer.vtkMRMLScene()
    try:
        ct = _shadowVolume(scene, volumeNode, "ct")
        ct.CreateDefaultDisplayNodes()
        ctDisplay = ct.GetDisplayNode()
        ctDisplay.SetAndObserveColorNodeID(_greyColorNode(scene).GetID())
        ctDisplay.AutoWindowLevelOff()
        ctWidth, ctLevel = _ctWindow(volumeNode, window)
        ctDisplay.SetWindowLevel(ctWidth, ctLevel)
        ctDisplay.SetInterpolate(1)
        heat = None
        if heatmapNode is not None and heatmapNode.GetImageData() is not None:
            heat = _shadowVolume(scene, heatmapNode, "heatmap")
            heat.SetAttribute(ATTR_SCALE, heatmapNode.GetAttribute(ATTR_SCALE) or "")
            configureHeatmapDisplay(heat, lowerThreshold)
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        sliceNode = logic.AddSliceNode("AnomalyFlagSnapshot")
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(ct.GetID())
        composite.SetForegroundVolumeID(heat.GetID() if heat is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        fov = max(width, height)
        sliceNode.SetDimensions(size, size, 1)
        sliceNode.SetFieldOfView(fov, fov, 1.0)
        sliceNode.SetXYZOrigin(0.0, 0.0, 0.0)
        sliceNode.GetSliceToRAS().DeepCopy(vtkMatrixFromArray(sliceToRAS))
        sliceNode.UpdateMatrices()
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        output = producer.GetOutputDataObject(0)
        dims = output.GetDimensions()
        if dims[0] != size or dims[1] != size:
            raise InputError(f"the slice pipeline produced a {dims[0]}x{dims[1]} image instead of {size}x{size}.")
        rgba = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(size, size, -1)
        xyToRAS = arrayFromVTKMatrix(sliceNode.GetXYToRAS())
        return np.ascontiguousarray(rgba[..., :3]).copy(), xyToRAS
    finally:
        scene.Clear(1)


def renderSliceSnapshot(volumeNode, heatmapNode, segmentationNode, sliceIndex, pngPath, size=512, opacity=0.5,
                        lowerThreshold=None, window=None, caption=None, score=None, outlineThickness=None,
                        segmentIds=None):  # fmt: skip
    """Write a PNG of slice `sliceIndex`: CT (`window` = (width, level); default: the display node's window
    when set by the user, else W 400 / L 40 for CT), heatmap overlay
    (colour table and threshold as in showHeatmap), segment outlines, and a caption (case, slice, score).
    Returns the path written."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError("No volume (with image data) to render.")
    size = int(size)
    rgb, xyToRAS = composeSlice(volumeNode, heatmapNode, sliceIndex, size, opacity, lowerThreshold, window)
    if segmentationNode is not None:
        thickness = int(outlineThickness or max(2, round(size / 256)))
        ids = list(segmentIds) if segmentIds else segmentIdsOf(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        for segmentId in ids:
            mask = _segmentMaskOnPlane(segmentationNode, segmentId, xyToRAS, size)
            if mask is None or not mask.any():
                continue
            color = np.round(np.asarray(segmentation.GetSegment(segmentId).GetColor()) * 255).astype(np.uint8)
            rgb[outlineOf(mask, thickness)] = color
    if caption is None:
        case = (heatmapNode.GetAttribute(ATTR_CASE) if heatmapNode is not None else None) or volumeNode.GetName()
        caption = f"{case}  slice {int(sliceIndex)}"
        if score is not None:
            caption += f"  score {float(score):.2f}"
    if caption:
        text = _caption(caption, max(10, size // 36))
        if text is not None:
            rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
            margin = max(2, size // 100)
            _blend(rgba, text, size - text.shape[0] - margin, margin)
            rgb = np.ascontiguousarray(rgba[..., :3])
    image = vtk.vtkImageData()
    image.SetDimensions(size, size, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    pngPath = os.fspath(pngPath)
    os.makedirs(os.path.dirname(os.path.abspath(pngPath)), exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(pngPath)
    writer.SetInputData(image)
    writer.Write()
    if not os.path.isfile(pngPath) or writer.GetErrorCode():
        raise InputError(f"the snapshot '{pngPath}' could not be written.")
    return pngPath
