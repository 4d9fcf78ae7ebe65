"""Helpers for the MRML bridge tests: a real MRML scene laid out like the Slicer application's
(default colours, red/yellow/green slice views with composite nodes), oblique volumes written with
SimpleITK and loaded through MRML storage nodes, and a scored phantom case."""

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


def rotation(ax, ay, az):
    """Rotation matrix about x, then y, then z (radians)."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = rotation(0.12, -0.08, 0.35)
ORIGIN = (-61.5, 37.25, -112.0)


def make_scene():
    import tempfile

    import slicer

    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()  # as the application sets up: needed to open .mrb bundles
    cache.SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="anomalyflag-mrml-cache-"))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    defaultSlice = slicer.vtkMRMLSliceNode()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    del defaultSlice
    logics = []
    for layout, orientation in VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        node = logic.AddSliceNode(layout)
        node.SetOrientation(orientation)
        node.SetDimensions(256, 256, 1)
        logics.append(logic)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    return scene, [colors, segmentations] + logics + [io, cache]


def scene_fixture():
    """Generator for a `mrml_scene` fixture: a fresh scene assigned to slicer.mrmlScene, set up as the
    application does; cleared and unassigned afterwards."""
    import slicer

    previous = getattr(slicer, "mrmlScene", None)
    scene, logics = make_scene()
    slicer.mrmlScene = scene
    yield scene
    close_scene(scene, logics)
    slicer.mrmlScene = previous


def close_scene(scene, logics):
    for logic in logics:
        if hasattr(logic, "SetMRMLScene"):
            logic.SetMRMLScene(None)
    scene.Clear(1)


def node_count(scene):
    return scene.GetNumberOfNodes()


def nodes_of_class(scene, class_name):
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def write_volume(path, array, spacing=(0.9, 1.1, 2.5), origin=ORIGIN, direction=OBLIQUE, pixel_type=None):
    """Write a (k, j, i) array with SimpleITK (oblique direction, non-trivial origin); returns the image."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    sitk.WriteImage(image, str(path), True)
    return image


def load_volume(scene, path, name=None, labelmap=False):
    """Load a volume file through MRML's volume archetype storage node (as Slicer's Add Data does)."""
    import slicer

    path = Path(path)
    node = scene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name or path.name.split(".")[0]
    )
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"MRML could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def load_segmentation(scene, path, name="segmentation"):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"MRML could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def segmentation_from_labels(scene, labels, geometry_node, name="organs", names=None):
    """Segmentation node with one segment per non-zero label of a (k, j, i) array on `geometry_node`'s grid."""
    import slicer
    import vtk
    from AnomalyFlagMRML.volumes import geometryFromVolumeNode, updateVolumeNodeFromArray

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    matrix = vtk.vtkMatrix4x4()
    geometry_node.GetIJKToRASMatrix(matrix)
    updateVolumeNodeFromArray(labelmap, labels.astype(np.int16), geometryFromVolumeNode(geometry_node))
    labelmap.SetIJKToRASMatrix(matrix)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    segmentation.CreateDefaultDisplayNodes()
    if names:
        seg = segmentation.GetSegmentation()
        for i, segment_name in enumerate(names):
            seg.GetNthSegment(i).SetName(segment_name)
    return segmentation


def save_segmentation(segmentation, path):
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    segmentation.GetScene().AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation), f"MRML could not write {path}"
    segmentation.GetScene().RemoveNode(storage)
    return Path(path)


def anomalous_phantom(num_slices=24, size=64, seed=5, kind="hyperdense_lesion"):
    from AnomalyFlagLib.phantom import make_phantom

    return make_phantom(num_slices=num_slices, size=size, seed=seed, anomalies=[{"kind": kind, "radius_mm": 14.0}])


def matrix_array(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_array(m)


def synthetic_result(geometry, heatmap, normalised=None, threshold=2.0, name="case", seed=0):
    """A CaseResult with the library's types for `geometry`: per-slice scores drawn at random (or given)."""
    from AnomalyFlagLib.orientation import AxialFrame, relative_positions, slice_positions_mm
    from AnomalyFlagLib.results import CaseResult, SliceTable

    frame = AxialFrame.from_geometry(geometry)
    n = geometry.size[frame.slice_ijk_axis]
    rng = np.random.default_rng(seed)
    if normalised is None:
        normalised = rng.normal(0.0, 1.5, n)
    normalised = np.asarray(normalised, dtype=float)
    z = slice_positions_mm(geometry, frame)
    recon = rng.uniform(0.01, 0.1, n)
    feat = rng.uniform(0.0, 0.01, n)
    in_roi = np.ones(n, dtype=bool)
    in_roi[: max(1, n // 8)] = False
    fraction = np.where(in_roi, rng.uniform(0, 0.2, n), np.nan)
    columns = {
        "index": np.arange(n),
        "z_mm": np.round(z, 3),
        "position": np.round(relative_positions(z), 4),
        "reconstruction": recon,
        "feature": feat,
        "score": recon + feat,
        "score_from": np.arange(n),
        "normalised": normalised,
        "flagged": (normalised > threshold) & in_roi,
        "in_roi": in_roi,
        "anomaly_fraction": fraction,
    }
    return CaseResult(
        name=name,
        geometry=geometry,
        slices=SliceTable(columns, {name: f"synthetic {name}" for name in columns}),
        threshold=float(threshold),
        model_name="synthetic-model",
        model_fingerprint="0123456789abcdef",
        heatmap=np.asarray(heatmap, dtype=np.uint8),
    )
