"""The anomaly heatmap as a scalar volume node: colour table, node attributes and slice-view display.

Stored values are uint8; value * scale (AnomalyFlag.HeatmapScale, 0.02) is the anomaly index, where 1.0
(stored 50) is the calibrated pixel threshold. The display shows the heatmap over the CT from the pixel
threshold up; below it the heatmap is transparent so normal tissue stays uncoloured.
"""

import logging

import numpy as np
import slicer
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.geometry import require_same_geometry
from AnomalyFlagLib.results import HEATMAP_SCALE, heatmap_colours

from .constants import (
    ATTR_CASE,
    ATTR_FINGERPRINT,
    ATTR_MODEL,
    ATTR_ROLE,
    ATTR_SCALE,
    ATTR_THRESHOLD,
    ATTR_UNITS,
    COLOR_NODE_NAME,
    DISPLAY_MAX_INDEX,
    HEATMAP_UNITS,
    INPUT_VOLUME_REFERENCE,
    ROLE_HEATMAP,
)
from .scene import getScene
from .volumes import copyVolumeGeometry, geometryFromVolumeNode, updateVolumeNodeFromArray


def getOrCreateHeatmapColorNode(scene=None):
    """The "AnomalyFlagHeatmap" colour table node (created once per scene, saved with the scene)."""
    scene = getScene(scene)
    existing = scene.GetNodesByClassByName("vtkMRMLColorTableNode", COLOR_NODE_NAME)
    existing.InitTraversal()
    node = existing.GetNextItemAsObject()
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetAttribute("Category", "AnomalyFlag")
    node.SetDescription("AnomalyFlag anomaly heatmap: transparent below the pixel threshold, yellow to red above.")
    colors = heatmap_colours()
    node.SetNumberOfColors(len(colors))
    for i, (r, g, b, a) in enumerate(colors):
        node.SetColor(i, f"index {i * DISPLAY_MAX_INDEX / (len(colors) - 1):.2f}", r, g, b, a)
    scene.AddNode(node)
    if node.GetStorageNode() is None:
        node.AddDefaultStorageNode()
    return node


def heatmapScale(heatmapNode) -> float:
    value = heatmapNode.GetAttribute(ATTR_SCALE) if heatmapNode is not None else None
    try:
        return float(value) if value else HEATMAP_SCALE
    except ValueError:
        return HEATMAP_SCALE


def createHeatmapNode(result, inputVolumeNode, heatmapNode=None, scene=None):
    """Scalar volume node holding `result.heatmap` (uint8) on the input volume's exact grid.

    The IJK-to-RAS matrix is copied from the input node (bit for bit) after checking that the result was
    computed on that grid; scale, units, model, threshold and case are stored as node attributes.
    """
    scene = getScene(scene)
    if result.heatmap is None:
        raise InputError(f"the result for {result.name} holds no in-memory heatmap.")
    if inputVolumeNode is None:
        raise InputError("No input volume node given for the heatmap.")
    require_same_geometry(geometryFromVolumeNode(inputVolumeNode), result.geometry,
                          f"volume '{inputVolumeNode.GetName()}'", f"the heatmap of {result.name}")  # fmt: skip
    if heatmapNode is None:
        heatmapNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{inputVolumeNode.GetName()} anomaly heatmap")
    heatmap = np.asarray(result.heatmap, dtype=np.uint8)
    updateVolumeNodeFromArray(heatmapNode, heatmap, result.geometry)
    copyVolumeGeometry(inputVolumeNode, heatmapNode)
    heatmapNode.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
    attributes = {
        ATTR_SCALE: repr(float(result.heatmap_scale)),
        ATTR_UNITS: HEATMAP_UNITS,
        ATTR_MODEL: result.model_name,
        ATTR_FINGERPRINT: result.model_fingerprint,
        ATTR_THRESHOLD: repr(float(result.threshold)),
        ATTR_CASE: result.name,
        ATTR_ROLE: ROLE_HEATMAP,
    }
    for key, value in attributes.items():
        heatmapNode.SetAttribute(key, str(value))
    heatmapNode.SetNodeReferenceID(INPUT_VOLUME_REFERENCE, inputVolumeNode.GetID())
    storage = heatmapNode.GetStorageNode()
    if storage is None:
        heatmapNode.AddDefaultStorageNode()
        storage = heatmapNode.GetStorageNode()
    if storage is not None:
        storage.SetUseCompression(True)
        storage.SetDefaultWriteFileExtension("nrrd")
    return heatmapNode


def configureHeatmapDisplay(heatmapNode, lowerThreshold=None):
    """Colour table, window/level and threshold of the heatmap's display node (created when missing)."""
    scale = heatmapScale(heatmapNode)
    if lowerThreshold is None:
        lowerThreshold = round(1.0 / scale)
    colorNode = getOrCreateHeatmapColorNode(heatmapNode.GetScene())
    displayNode = heatmapNode.GetDisplayNode()
    if displayNode is None:
        heatmapNode.CreateDefaultDisplayNodes()
        displayNode = heatmapNode.GetDisplayNode()
    upper = DISPLAY_MAX_INDEX / scale
    wasModifying = displayNode.StartModify()
    try:
        displayNode.SetAndObserveColorNodeID(colorNode.GetID())
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, upper)
        displayNode.AutoThresholdOff()
        displayNode.SetThreshold(float(lowerThreshold), 255.0)
        displayNode.ApplyThresholdOn()
        displayNode.SetInterpolate(1)
    finally:
        displayNode.EndModify(wasModifying)
    return displayNode


def showHeatmap(heatmapNode, inputVolumeNode, opacity=0.5, lowerThreshold=None):
    """Show the heatmap as the foreground over the input in every slice view of the scene."""
    if heatmapNode is None:
        raise InputError("No heatmap node to show.")
    displayNode = configureHeatmapDisplay(heatmapNode, lowerThreshold)
    scene = heatmapNode.GetScene()
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        wasModifying = composite.StartModify()
        composite.SetBackgroundVolumeID(inputVolumeNode.GetID() if inputVolumeNode is not None else None)
        composite.SetForegroundVolumeID(heatmapNode.GetID())
        composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(wasModifying)
    if composites.GetNumberOfItems() == 0:
        logging.info("AnomalyFlag: the scene has no slice views; heatmap display settings were stored only.")
    return displayNode
