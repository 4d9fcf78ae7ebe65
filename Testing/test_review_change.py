"""The per-slice change measure (numpy) and versioned label paths."""

import numpy as np
import pytest
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.scored_case import CaseFiles
from AnomalyFlagLib.orientation import AxialFrame
from AnomalyFlagLib.review.label_versions import (
    latest_version,
    list_versions,
    next_version_path,
    write_new_version,
)
from AnomalyFlagLib.review.session import slice_change

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
# k runs anterior (-P), j runs superior: slices are taken along j
CORONAL_STORED = (1.0, 0, 0, 0, 0, -1.0, 0, 1.0, 0)


def test_slice_change_dice_and_counts_on_one_axial_slice():
    geometry = Geometry((10, 8, 6), (1.0, 1.0, 2.0), (0, 0, 0), IDENTITY)
    original = np.zeros((6, 8, 10), dtype=np.uint8)
    original[2, 2:6, 2:7] = 1  # 20 voxels on slice 2
    original[3, 2:6, 2:7] = 1
    edited = original.copy()
    edited[2, 2:4, 2:7] = 0  # 10 removed
    edited[2, 6, 2:4] = 1  # 2 added
    change = slice_change(original, edited, 2, AxialFrame.from_geometry(geometry))
    assert change == {"dice": pytest.approx(2 * 10 / (20 + 12)), "changed_voxels": 12, "original_voxels": 20,
                      "edited_voxels": 12}  # fmt: skip
    unchanged = slice_change(original, edited, 3, geometry)  # a Geometry gives the frame too
    assert unchanged == {"dice": 1.0, "changed_voxels": 0, "original_voxels": 20, "edited_voxels": 20}
    empty = slice_change(original, edited, 0, geometry)
    assert empty == {"dice": 1.0, "changed_voxels": 0, "original_voxels": 0, "edited_voxels": 0}
    everything = slice_change(original, np.zeros_like(original), 3, geometry)
    assert everything["dice"] == 0.0 and everything["changed_voxels"] == 20


def test_slice_change_dice_is_exact_in_double_precision_empty_slices_included():
    geometry = Geometry((9, 7, 5), (1.0, 1.0, 1.0), (0, 0, 0), IDENTITY)
    rng = np.random.default_rng(7)
    for trial in range(40):
        original, edited = (rng.random((2, 5, 7, 9)) < rng.random(2)[:, None, None, None] * 0.4).astype(np.uint8)
        if trial % 3:
            original[0] = 0  # slice 0 often empty in one label or both
        if trial % 4:
            edited[0] = 0
        for k in range(5):
            a, b = original[k] != 0, edited[k] != 0
            total = int(a.sum() + b.sum())
            expected = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
            assert slice_change(original, edited, k, geometry)["dice"] == expected


def test_slice_change_follows_the_slice_axis_of_the_scoring():
    geometry = Geometry((10, 8, 6), (1.0, 1.0, 1.0), (0, 0, 0), CORONAL_STORED)
    frame = AxialFrame.from_geometry(geometry)
    assert frame.slice_ijk_axis == 1  # j is the superior axis
    original = np.zeros((6, 8, 10), dtype=np.uint8)
    original[:, 5, :] = 1  # the whole j = 5 plane: one axial slice in this volume
    edited = original.copy()
    edited[0, 5, :] = 0  # 10 voxels of that slice removed
    change = slice_change(original, edited, 5, frame)
    assert change["original_voxels"] == 60 and change["changed_voxels"] == 10 and change["edited_voxels"] == 50
    assert slice_change(original, edited, 0, frame)["original_voxels"] == 0  # k = 0 is not slice 0
    assert slice_change(original, edited, 4, frame)["dice"] == 1.0


def test_slice_change_labels_and_errors():
    geometry = Geometry((4, 4, 3), (1.0, 1.0, 1.0), (0, 0, 0), IDENTITY)
    original = np.zeros((3, 4, 4), dtype=np.int16)
    original[1, :2, :2] = 2
    original[1, 2:, 2:] = 5
    edited = original.copy()
    edited[1, 2:, 2:] = 0
    assert slice_change(original, edited, 1, geometry, labels=[2])["dice"] == 1.0
    assert slice_change(original, edited, 1, geometry, labels=[5])["dice"] == 0.0
    assert slice_change(original, edited, 1, geometry)["changed_voxels"] == 4
    with pytest.raises(InputError, match="shape"):
        slice_change(original, edited[:2], 1, geometry)
    with pytest.raises(InputError, match="outside"):
        slice_change(original, edited, 3, geometry)


def test_versions_count_up_and_never_touch_existing_files(tmp_path):
    original = tmp_path / "case1_seg.seg.nrrd"
    original.write_bytes(b"original")
    assert next_version_path(tmp_path, "case1") == tmp_path / "case1_seg_v1.seg.nrrd"
    assert latest_version(tmp_path, "case1") is None
    first = write_new_version(tmp_path, "case1", lambda p: p.write_bytes(b"one"))
    second = write_new_version(tmp_path, "case1", lambda p: p.write_bytes(b"two"))
    assert (first.name, second.name) == ("case1_seg_v1.seg.nrrd", "case1_seg_v2.seg.nrrd")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert original.read_bytes() == b"original"
    CaseFiles(tmp_path, "case1").label_version(9).write_bytes(b"nine")  # gaps are not reused
    CaseFiles(tmp_path, "case10").label_version(1).write_bytes(b"other case")
    assert next_version_path(tmp_path, "case1").name == "case1_seg_v10.seg.nrrd"
    assert [v for v, _ in list_versions(tmp_path, "case1")] == [1, 2, 9]
    assert latest_version(tmp_path, "case1").read_bytes() == b"nine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_version_taken_meanwhile_is_not_overwritten(tmp_path):
    def write(tmp):
        # another writer publishes v1 while this one is still writing
        CaseFiles(tmp_path, "case1").label_version(1).write_bytes(b"theirs")
        tmp.write_bytes(b"mine")

    path = write_new_version(tmp_path, "case1", write)
    assert path.name == "case1_seg_v2.seg.nrrd" and path.read_bytes() == b"mine"
    assert CaseFiles(tmp_path, "case1").label_version(1).read_bytes() == b"theirs"


def test_failed_writes_and_bad_names(tmp_path):
    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(SessionError, match="No space left"):
        write_new_version(tmp_path, "case1", fail)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SessionError, match="was not written"):
        write_new_version(tmp_path, "case1", lambda p: None)
    with pytest.raises(InputError, match="case name"):
        next_version_path(tmp_path, "../case1")
    with pytest.raises(SessionError, match="does not exist"):
        write_new_version(tmp_path / "missing", "case1", lambda p: p.write_bytes(b"x"))


def test_change_measure_without_torch_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    label = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(SessionError, match="needs torch and MONAI"):
        slice_change(label, label, 1, Geometry((4, 4, 3), (1.0, 1.0, 1.0), (0, 0, 0), IDENTITY))
