"""Heatmap, score table, chart, segmentation, navigation and snapshot nodes on real MRML, with an oblique
input volume loaded from NRRD and a segmentation saved to and reloaded from .seg.nrrd."""

import numpy as np
import pytest
import vtk
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.orientation import AxialFrame
from mrml_support import (
    ORIGIN,
    anomalous_phantom,
    ijk_to_ras,
    load_segmentation,
    load_volume,
    node_count,
    nodes_of_class,
    rotation,
    save_segmentation,
    scene_fixture,
    segmentation_from_labels,
    synthetic_result,
    write_volume,
)


@pytest.fixture
def mrml_scene():
    yield from scene_fixture()


@pytest.fixture
def phantom_case(mrml_scene, tmp_path):
    """Oblique phantom with one lesion, loaded from NRRD; heatmap hot on the lesion; liver segmentation."""
    from AnomalyFlagMRML.volumes import geometryFromVolumeNode

    phantom = anomalous_phantom()
    direction = rotation(0.05, -0.04, 0.3)
    write_volume(tmp_path / "ct.nrrd", phantom.image, spacing=phantom.spacing, origin=ORIGIN, direction=direction)
    volume = load_volume(mrml_scene, tmp_path / "ct.nrrd", "phantom")
    geometry = geometryFromVolumeNode(volume)
    heat = (phantom.anomaly_mask > 0).astype(np.uint8) * 180
    result = synthetic_result(geometry, heat, name="phantom")
    return {"phantom": phantom, "volume": volume, "geometry": geometry, "result": result}


def test_heatmap_node_has_the_input_geometry_and_attributes(mrml_scene, phantom_case):
    from AnomalyFlagMRML.heatmap import createHeatmapNode
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode

    volume, result = phantom_case["volume"], phantom_case["result"]
    node = createHeatmapNode(result, volume)
    np.testing.assert_array_equal(ijk_to_ras(node), ijk_to_ras(volume))
    assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    array, geometry = arrayAndGeometryFromVolumeNode(node)
    np.testing.assert_array_equal(array, result.heatmap)
    assert array.dtype == np.uint8
    assert float(node.GetAttribute("AnomalyFlag.HeatmapScale")) == result.heatmap_scale
    assert node.GetAttribute("AnomalyFlag.Model") == result.model_name
    assert float(node.GetAttribute("AnomalyFlag.Threshold")) == result.threshold
    assert node.GetNodeReference("AnomalyFlag.InputVolume") is volume


def test_heatmap_on_another_grid_is_refused_without_adding_nodes(mrml_scene, phantom_case):
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagMRML.heatmap import createHeatmapNode

    g = phantom_case["geometry"]
    shifted = Geometry(g.size, g.spacing, (g.origin[0] + 5.0, g.origin[1], g.origin[2]), g.direction)
    result = synthetic_result(shifted, phantom_case["result"].heatmap)
    before = node_count(mrml_scene)
    with pytest.raises(InputError, match="geometry"):
        createHeatmapNode(result, phantom_case["volume"])
    assert node_count(mrml_scene) == before


def test_show_heatmap_sets_colours_threshold_and_every_slice_view(mrml_scene, phantom_case):
    from AnomalyFlagMRML.heatmap import COLOR_NODE_NAME, createHeatmapNode, showHeatmap

    volume, result = phantom_case["volume"], phantom_case["result"]
    node = createHeatmapNode(result, volume)
    showHeatmap(node, volume, opacity=0.4)
    display = node.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == COLOR_NODE_NAME
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(1.0 / result.heatmap_scale)
    assert display.GetWindowLevelMin() <= display.GetLowerThreshold() < display.GetWindowLevelMax()
    assert not display.GetAutoWindowLevel()
    lut = color.GetLookupTable()
    assert lut.GetTableValue(0)[3] == 0.0  # transparent at 0
    top = lut.GetTableValue(lut.GetNumberOfTableValues() - 1)
    assert top[0] > 0.8 and top[1] < 0.2 and top[3] == 1.0  # red at the top
    composites = nodes_of_class(mrml_scene, "vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    showHeatmap(node, volume)  # a second call reuses the colour node
    assert len([n for n in nodes_of_class(mrml_scene, "vtkMRMLColorTableNode") if n.GetName() == COLOR_NODE_NAME]) == 1


def _column(table_node, name):
    array = table_node.GetTable().GetColumnByName(name)
    return array, np.array([array.GetVariantValue(i).ToDouble() for i in range(array.GetNumberOfTuples())])


def test_score_table_and_chart(mrml_scene, phantom_case):
    from AnomalyFlagMRML.scoreTable import createScoreChart, createScoreTable, flaggedSlicesFromTable

    result = phantom_case["result"]
    result = result.with_threshold(float(np.quantile(result.slices["normalised"], 0.7)))
    table = createScoreTable(result)
    assert table.GetNumberOfRows() == len(result.slices) == phantom_case["phantom"].image.shape[0]
    names = result.slices.names
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == names
    assert [table.GetColumnDescription(name) for name in names] == [result.slices.descriptions[n] for n in names]
    kinds = {name: _column(table, name)[0].GetClassName() for name in names}
    assert kinds["index"] == "vtkIntArray" and kinds["flagged"] == "vtkBitArray" and kinds["in_roi"] == "vtkBitArray"
    assert kinds["normalised"] == "vtkDoubleArray"
    for name in names:
        np.testing.assert_allclose(_column(table, name)[1], result.slices[name].astype(float), equal_nan=True)
    assert flaggedSlicesFromTable(table) == result.flagged_indices and result.flagged_indices

    chart = createScoreChart(table, result.threshold)
    series = {chart.GetNthPlotSeriesNode(i).GetAttribute("AnomalyFlag.Series"): chart.GetNthPlotSeriesNode(i)
              for i in range(chart.GetNumberOfPlotSeriesNodes())}  # fmt: skip
    assert set(series) == {"score", "threshold", "flagged"}
    score = series["score"]
    assert (
        score.GetTableNode() is table and score.GetYColumnName() == "normalised" and score.GetXColumnName() == "index"
    )
    assert score.GetMarkerStyle() == score.MarkerStyleNone and score.GetLineStyle() != score.LineStyleNone
    flagged = series["flagged"]
    assert flagged.GetLineStyle() == flagged.LineStyleNone and flagged.GetMarkerStyle() != flagged.MarkerStyleNone
    data = flagged.GetTableNode()
    _, flagged_y = _column(data, flagged.GetYColumnName())
    _, x = _column(data, "index")
    assert sorted(int(i) for i in x[~np.isnan(flagged_y)]) == result.flagged_indices
    _, threshold_y = _column(series["threshold"].GetTableNode(), series["threshold"].GetYColumnName())
    np.testing.assert_allclose(threshold_y, result.threshold)
    # updating the same chart with another threshold reuses its series
    count = node_count(mrml_scene)
    createScoreChart(table, result.threshold + 1.0, chart)
    assert node_count(mrml_scene) == count
    _, threshold_y = _column(series["threshold"].GetTableNode(), "threshold")
    np.testing.assert_allclose(threshold_y, result.threshold + 1.0)


def test_roi_mask_from_a_reloaded_seg_nrrd(mrml_scene, phantom_case, tmp_path):
    from AnomalyFlagLib.phantom import ORGAN_LABELS
    from AnomalyFlagMRML.segmentation import roiMaskFromSegmentation, segmentIdsOf, showSegmentationOutlines

    phantom, volume = phantom_case["phantom"], phantom_case["volume"]
    labels = np.zeros_like(phantom.organs)
    labels[phantom.organs == ORGAN_LABELS["liver"]] = 1
    labels[phantom.organs == ORGAN_LABELS["spleen"]] = 2
    made = segmentation_from_labels(mrml_scene, labels, volume, names=["liver", "spleen"])
    save_segmentation(made, tmp_path / "organs.seg.nrrd")
    mrml_scene.RemoveNode(made)
    segmentation = load_segmentation(mrml_scene, tmp_path / "organs.seg.nrrd")
    ids = segmentIdsOf(segmentation)
    names = [segmentation.GetSegmentation().GetSegment(s).GetName() for s in ids]
    liver = roiMaskFromSegmentation(segmentation, [ids[names.index("liver")]], volume)
    assert liver.shape == phantom.image.shape and liver.dtype == bool
    np.testing.assert_array_equal(liver, labels == 1)
    np.testing.assert_array_equal(roiMaskFromSegmentation(segmentation, None, volume), labels > 0)
    np.testing.assert_array_equal(roiMaskFromSegmentation(segmentation, ["spleen"], volume), labels == 2)
    with pytest.raises(InputError, match="no segment 'kidney'"):
        roiMaskFromSegmentation(segmentation, ["kidney"], volume)

    display = showSegmentationOutlines(segmentation)
    assert display.GetVisibility() and display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    assert display.GetSliceIntersectionThickness() >= 2


def test_segmentation_on_another_scan_is_refused(mrml_scene, phantom_case, tmp_path):
    from AnomalyFlagMRML.segmentation import roiMaskFromSegmentation

    phantom = phantom_case["phantom"]
    far = np.asarray(ORIGIN) + np.array([400.0, 0.0, 0.0])
    write_volume(tmp_path / "other.nrrd", (phantom.organs > 1).astype(np.uint8), spacing=phantom.spacing, origin=far)
    other = load_volume(mrml_scene, tmp_path / "other.nrrd", "other", labelmap=True)
    segmentation = segmentation_from_labels(mrml_scene, (phantom.organs == 2).astype(np.uint8), other, names=["liver"])
    before = node_count(mrml_scene)
    with pytest.raises(InputError, match="segment 'liver'.*does not overlap"):
        roiMaskFromSegmentation(segmentation, None, phantom_case["volume"])
    assert node_count(mrml_scene) == before


def _ras_of_ijk(node, ijk):
    return (ijk_to_ras(node) @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]


def _distance_to_plane(slice_node, point):
    from mrml_support import matrix_array

    m = matrix_array(slice_node.GetSliceToRAS())
    return float(np.dot(m[:3, 2], np.asarray(point) - m[:3, 3]))


def _plane_centre(slice_node):
    from mrml_support import matrix_array

    return matrix_array(slice_node.GetSliceToRAS())[:3, 3]


def test_hottest_point_and_jump_to_slice(mrml_scene, phantom_case):
    from AnomalyFlagMRML.heatmap import createHeatmapNode
    from AnomalyFlagMRML.navigation import hottestPointRAS, jumpToSlice

    volume, geometry, phantom = phantom_case["volume"], phantom_case["geometry"], phantom_case["phantom"]
    frame = AxialFrame.from_geometry(geometry)
    heat = np.zeros(phantom.image.shape, np.uint8)
    k = phantom.image.shape[0] // 2  # phantom arrays are (k, j, i) with slices along k
    assert frame.slice_ijk_axis == 2
    heat[k, 20:24, 30:35] = 200  # the hottest blob
    heat[k, 40:42, 10:12] = 120  # a cooler one elsewhere
    heat[k, 22, 36] = 120  # touching the hot blob but below half its maximum
    result = synthetic_result(geometry, heat)
    node = createHeatmapNode(result, volume)
    point = hottestPointRAS(volume, node, k)
    np.testing.assert_allclose(point, _ras_of_ijk(volume, [32.0, 21.5, k]), atol=1e-6)
    centre = hottestPointRAS(volume, node, k + 1)  # no heat there: slice centre
    size = geometry.size
    np.testing.assert_allclose(centre, _ras_of_ijk(volume, [(size[0] - 1) / 2, (size[1] - 1) / 2, k + 1]), atol=1e-6)
    with pytest.raises(InputError, match="outside"):
        hottestPointRAS(volume, node, size[2])

    jumped = jumpToSlice(volume, node, k)
    np.testing.assert_allclose(jumped, point)
    slice_nodes = {n.GetName(): n for n in nodes_of_class(mrml_scene, "vtkMRMLSliceNode")}
    assert set(slice_nodes) == {"Red", "Yellow", "Green"}
    assert slice_nodes["Red"].GetSliceOffset() == pytest.approx(point[2], abs=1e-6)  # axial: offset = S
    for name in ("Red", "Yellow", "Green"):
        assert _distance_to_plane(slice_nodes[name], point) == pytest.approx(0.0, abs=1e-6)
        np.testing.assert_allclose(_plane_centre(slice_nodes[name]), point, atol=1e-6)  # centred on it
    jumpToSlice(volume, node, k + 1, sliceNodes=[slice_nodes["Red"]])
    assert slice_nodes["Red"].GetSliceOffset() == pytest.approx(centre[2], abs=1e-6)
    assert _distance_to_plane(slice_nodes["Yellow"], point) == pytest.approx(0.0, abs=1e-6)  # not moved


def _read_png(path):
    from vtk.util import numpy_support

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    w, h, _ = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)  # rows from the bottom


def _plane_voxels(volume, k, size):
    """Nearest (i, j, k) voxel of every snapshot pixel (rows from the bottom) and whether it is inside."""
    from AnomalyFlagMRML.snapshot import slicePlane

    slice_to_ras, (width, height) = slicePlane(volume, k)
    fov = max(width, height)
    ys, xs = np.mgrid[0:size, 0:size]
    local = np.stack([(xs - size / 2.0) * fov / size, (ys - size / 2.0) * fov / size, np.zeros_like(xs),
                      np.ones_like(xs)], axis=-1).reshape(-1, 4)  # fmt: skip
    ijk = (np.linalg.inv(ijk_to_ras(volume)) @ slice_to_ras @ local.T).T[:, :3]
    idx = np.round(ijk).astype(int)
    dims = volume.GetImageData().GetDimensions()
    inside = (idx >= 0).all(axis=1) & (idx[:, 0] < dims[0]) & (idx[:, 1] < dims[1]) & (idx[:, 2] < dims[2])
    np.testing.assert_allclose(ijk[:, 2], k, atol=1e-6)  # the snapshot shows exactly slice k
    return idx, inside


def _plane_bilinear(volume, k, array_kji, size):
    """Bilinear interpolation of slice k of a (k, j, i) array at every snapshot pixel (NaN outside)."""
    from AnomalyFlagMRML.snapshot import slicePlane

    slice_to_ras, (width, height) = slicePlane(volume, k)
    fov = max(width, height)
    ys, xs = np.mgrid[0:size, 0:size]
    local = np.stack([(xs - size / 2.0) * fov / size, (ys - size / 2.0) * fov / size, np.zeros_like(xs),
                      np.ones_like(xs)], axis=-1).reshape(-1, 4)  # fmt: skip
    ijk = (np.linalg.inv(ijk_to_ras(volume)) @ slice_to_ras @ local.T).T[:, :3]
    plane = array_kji[k].astype(float)
    i, j = ijk[:, 0], ijk[:, 1]
    i0, j0 = np.floor(i).astype(int), np.floor(j).astype(int)
    ok = (i0 >= 0) & (j0 >= 0) & (i0 + 1 < plane.shape[1]) & (j0 + 1 < plane.shape[0])
    out = np.full(len(i), np.nan)
    fi, fj = i[ok] - i0[ok], j[ok] - j0[ok]
    a, b = plane[j0[ok], i0[ok]], plane[j0[ok], i0[ok] + 1]
    c, d = plane[j0[ok] + 1, i0[ok]], plane[j0[ok] + 1, i0[ok] + 1]
    out[ok] = (a * (1 - fi) + b * fi) * (1 - fj) + (c * (1 - fi) + d * fi) * fj
    return out.reshape(size, size)


def _plane_values(volume, k, array_kji, size, outside=0):
    idx, inside = _plane_voxels(volume, k, size)
    out = np.full(len(idx), outside, dtype=array_kji.dtype)
    out[inside] = array_kji[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    return out.reshape(size, size)


def _plane_mask(volume, k, mask_kji, size):
    """Where a (k, j, i) mask of slice k lands in a snapshot."""
    return _plane_values(volume, k, mask_kji, size, outside=False)


def _is_heat_colour(png):
    r, g, b = (png[..., c].astype(int) for c in range(3))
    return (r - b > 60) & (r > 120)  # warm: yellow to red, never grey CT


def test_snapshot_shows_heatmap_and_outlines_where_they_are(mrml_scene, phantom_case, tmp_path):
    from AnomalyFlagLib.phantom import ORGAN_LABELS
    from AnomalyFlagMRML.heatmap import createHeatmapNode
    from AnomalyFlagMRML.snapshot import renderSliceSnapshot

    volume, phantom, result = phantom_case["volume"], phantom_case["phantom"], phantom_case["result"]
    k = int(np.argmax(phantom.anomaly_mask.sum(axis=(1, 2))))
    heatmap = createHeatmapNode(result, volume)
    region = ORGAN_LABELS[phantom.anomalies[0]["region"]]
    organ = (phantom.organs == region).astype(np.uint8)
    segmentation = segmentation_from_labels(mrml_scene, organ, volume, names=["organ"])
    segmentation.GetSegmentation().GetNthSegment(0).SetColor(0.0, 1.0, 0.0)
    size = 256
    before = node_count(mrml_scene)
    png = _read_png(renderSliceSnapshot(volume, heatmap, segmentation, k, tmp_path / "hot.png", size=size, score=3.5))
    assert node_count(mrml_scene) == before
    assert png.shape[:2] == (size, size)

    hot = _plane_mask(volume, k, phantom.anomaly_mask > 0, size)
    warm = _is_heat_colour(png)
    assert hot.sum() > 50
    assert warm[hot].mean() > 0.6  # the lesion is coloured
    caption = np.zeros_like(warm)
    caption[-size // 8 :, :] = True
    assert warm[~hot & ~caption].mean() < 0.01  # nothing else is

    organ_plane = _plane_mask(volume, k, organ > 0, size)
    green = (png[..., 1] > 200) & (png[..., 0] < 80) & (png[..., 2] < 80)
    boundary = organ_plane ^ np.roll(organ_plane, 1, 0) | organ_plane ^ np.roll(organ_plane, 1, 1)
    near = boundary.copy()
    for shift in (-3, -2, -1, 1, 2, 3):
        near |= np.roll(boundary, shift, 0) | np.roll(boundary, shift, 1)
    assert green.sum() > 40
    assert green[near].sum() / green.sum() > 0.95  # outline pixels lie along the segment boundary
    assert green[boundary].mean() > 0.5  # and follow it all around
    assert not green[organ_plane & ~near].any()  # not filled

    zero = createHeatmapNode(synthetic_result(phantom_case["geometry"], np.zeros_like(result.heatmap)), volume)
    plain = _read_png(renderSliceSnapshot(volume, zero, None, k, tmp_path / "zero.png", size=size))
    assert not _is_heat_colour(plain)[~caption].any()
    assert not ((plain[..., 1] > 200) & (plain[..., 0] < 80)).any()
    grey = plain[..., 0].astype(float)
    assert np.abs(plain[~caption].astype(int)[:, 0] - plain[~caption].astype(int)[:, 2]).max() <= 1  # grey CT
    # the CT is shown in a soft-tissue window (W 400, L 40): compare with the windowed voxels of slice k
    hu = _plane_bilinear(volume, k, phantom.image, size)
    inner = ~caption & np.isfinite(hu)
    assert inner.sum() > size * size / 2

    def assert_window(png_grey, width, level):
        windowed = np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0) * 255.0
        assert np.corrcoef(png_grey[inner], windowed[inner])[0, 1] > 0.99
        assert np.median(np.abs(png_grey[inner] - windowed[inner])) < 2

    assert_window(grey, 400.0, 40.0)  # automatic window/level on a CT: a soft-tissue window
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1500.0, 300.0)  # a window the user chose is followed
    chosen = _read_png(renderSliceSnapshot(volume, zero, None, k, tmp_path / "chosen.png", size=size))
    assert_window(chosen[..., 0].astype(float), 1500.0, 300.0)
