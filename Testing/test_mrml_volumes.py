"""Volume nodes <-> arrays and LPS geometry, through real MRML storage nodes (NRRD and NIfTI)."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.geometry import Geometry
from mrml_support import OBLIQUE, ijk_to_ras, load_volume, scene_fixture, write_volume


@pytest.fixture
def mrml_scene():
    yield from scene_fixture()


def _volume(shape=(12, 20, 16), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_geometry_and_voxels_match_the_file(mrml_scene, tmp_path, suffix):
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode

    array = _volume()
    image = write_volume(tmp_path / f"ct{suffix}", array)
    node = load_volume(mrml_scene, tmp_path / f"ct{suffix}")
    got, geometry = arrayAndGeometryFromVolumeNode(node)
    reread = sitk.ReadImage(str(tmp_path / f"ct{suffix}"))
    expected = Geometry.from_image(reread)
    assert geometry.size == expected.size == tuple(image.GetSize())
    np.testing.assert_allclose(geometry.spacing, expected.spacing, atol=1e-5)
    np.testing.assert_allclose(geometry.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(geometry.direction_matrix, expected.direction_matrix, atol=1e-5)
    assert not np.allclose(geometry.direction_matrix, np.eye(3))
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(reread))
    # the same physical point in both conventions: LPS from the library = RAS from MRML with x, y negated
    ijk = np.array([3.0, 7.0, 5.0])
    ras = ijk_to_ras(node) @ np.append(ijk, 1.0)
    np.testing.assert_allclose(geometry.index_to_physical(ijk), ras[:3] * [-1, -1, 1], atol=1e-4)


def test_update_from_array_sets_the_matrix_exactly(mrml_scene):
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode, ijkToRASFromGeometry, updateVolumeNodeFromArray

    geometry = Geometry((16, 20, 12), (0.7, 1.3, 3.0), (10.5, -20.25, 33.0), tuple(OBLIQUE.ravel()))
    array = _volume((12, 20, 16), seed=1)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    updateVolumeNodeFromArray(node, array, geometry)
    np.testing.assert_allclose(ijk_to_ras(node), ijkToRASFromGeometry(geometry), atol=1e-12)
    got, back = arrayAndGeometryFromVolumeNode(node)
    np.testing.assert_array_equal(got, array)
    assert back.matches(geometry, tolerance_mm=1e-9)
    got[0, 0, 0] += 1  # a copy: the node's voxels are not touched
    again, _ = arrayAndGeometryFromVolumeNode(node)
    assert again[0, 0, 0] == array[0, 0, 0]


def _scalar_node(scene, array):
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "bad")
    geometry = Geometry(tuple(array.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    updateVolumeNodeFromArray(node, array, geometry)
    return node


def test_bad_volumes_are_rejected_with_clear_errors(mrml_scene):
    import vtk
    from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode
    from vtk.util import numpy_support

    with pytest.raises(InputError, match="No input volume"):
        arrayAndGeometryFromVolumeNode(None)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        arrayAndGeometryFromVolumeNode(empty)
    flat = _scalar_node(mrml_scene, _volume((1, 20, 16)))
    with pytest.raises(InputError, match="2D"):
        arrayAndGeometryFromVolumeNode(flat)
    constant = _scalar_node(mrml_scene, np.full((5, 6, 7), 42, np.int16))
    with pytest.raises(InputError, match="constant"):
        arrayAndGeometryFromVolumeNode(constant)
    nan = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        arrayAndGeometryFromVolumeNode(_scalar_node(mrml_scene, nan))
    vector = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(7, 6, 5)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.zeros((5 * 6 * 7, 3), np.uint8), deep=True))
    vector.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="3 components"):
        arrayAndGeometryFromVolumeNode(vector)
    fourD = _scalar_node(mrml_scene, _volume((5, 6, 7)))
    multi = vtk.vtkImageData()
    multi.SetDimensions(7, 6, 5)
    multi.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ones((5 * 6 * 7, 4), np.int16), deep=True))
    fourD.SetAndObserveImageData(multi)  # a 4D (multi-frame) volume stored as components
    with pytest.raises(InputError, match="4 components"):
        arrayAndGeometryFromVolumeNode(fourD)
