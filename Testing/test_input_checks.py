"""Damaged or impossible inputs are refused with one message naming the input and the problem."""

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import EXIT_USAGE, main
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.cases import Case, discover_cases, roi_for_case
from AnomalyFlagLib.io.nrrd_header import read_header
from AnomalyFlagLib.io.slice_source import open_source
from AnomalyFlagLib.io.volumes import read_image
from AnomalyFlagLib.phantom import make_phantom, write_dicom_series


@pytest.fixture(scope="module")
def volume() -> sitk.Image:
    phantom = make_phantom(num_slices=12, size=48, seed=2)
    image = sitk.GetImageFromArray(phantom.image)
    image.SetSpacing(phantom.spacing)
    image.SetOrigin((-36.0, -36.0, 100.0))
    return image


def sagittal(image: sitk.Image) -> sitk.Image:
    """The same anatomy stored with k left-right, so it is read whole rather than streamed."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))))
    sp = image.GetSpacing()
    out.SetSpacing((sp[2], sp[1], sp[0]))
    out.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))
    return out


def read_all(path):
    source = open_source(path)
    try:
        return np.concatenate([source.read(k, min(source.num_slices, k + 5)) for k in range(0, source.num_slices, 5)])
    finally:
        source.close()


def data_offset(path) -> int:
    """Where the voxel data (or the compressed stream) of an NRRD or MHA file starts."""
    if str(path).endswith(".nrrd"):
        return int(read_header(path)["_data_offset"])
    data = path.read_bytes()
    return data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")


def flip(path, positions) -> None:
    data = bytearray(path.read_bytes())
    for p in positions:
        data[p] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,store", [("axial.nrrd", None), ("sagittal.nrrd", sagittal), ("c.nii.gz", None),
                                        ("c.mha", None)])  # fmt: skip
def test_corrupt_compressed_data_is_refused(volume, tmp_path, name, store):
    path = tmp_path / name
    sitk.WriteImage(store(volume) if store else volume, str(path), useCompression=True)
    assert read_all(path).size == volume.GetNumberOfPixels()
    size = path.stat().st_size
    start = 10 if name.endswith(".nii.gz") else data_offset(path) + 10  # past the gzip/zlib stream header
    for mutate in ("flip", "flip trailer", "truncate"):
        damaged = tmp_path / f"damaged_{name}"
        shutil.copy(path, damaged)
        if mutate == "flip":
            flip(damaged, [start + (size - start) // 2])
        elif mutate == "flip trailer":
            flip(damaged, [size - 6])  # gzip CRC / ISIZE, zlib Adler-32
        else:
            damaged.write_bytes(path.read_bytes()[: (start + size) // 2])
        with pytest.raises(InputError, match=f"damaged_{name}.* (is damaged|is truncated)"):
            read_all(damaged)
        with pytest.raises(InputError, match=f"damaged_{name}"):
            read_image(damaged)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".mha"])
def test_truncated_raw_data_is_refused(volume, tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    sitk.WriteImage(volume, str(path), useCompression=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match=r"cut.* is truncated: .* \(1000 missing\)"):
        read_all(path)
    with pytest.raises(InputError, match="is truncated"):
        read_image(path)
    path.write_bytes(data + bytes(48 * 48 * 2))  # one more slice than the header describes
    with pytest.raises(InputError, match="more voxel data than its header"):
        read_all(path)


def test_a_corrupt_gzip_case_fails_alone(tiny_model, volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(volume, str(scans / "good.nrrd"), useCompression=True)
    sitk.WriteImage(volume, str(scans / "bad.nrrd"), useCompression=True)
    size = (scans / "bad.nrrd").stat().st_size
    flip(scans / "bad.nrrd", [size - 300, size - 200])
    out = tmp_path / "out"
    rc = main(["score", "--model", str(tiny_model), "--input", str(scans), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert "bad: FAILED: volume" in err and "bad.nrrd' is damaged: its gzip data is corrupt" in err
    assert "Traceback" not in err and "zlib.error" not in err
    assert (out / "good_summary.json").is_file() and not (out / "bad_summary.json").exists()


# DICOM series


@pytest.fixture()
def series(volume, tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(volume, folder)
    return folder


def retag(file, **tags):
    """Rewrite one DICOM file with some tags changed (keys as 'gggg|eeee')."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    image = reader.Execute()
    for key, value in tags.items():
        image.SetMetaData(key.replace("_", "|"), value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(file))
    writer.Execute(image)


def test_dicom_series_with_a_missing_slice_is_refused(series):
    assert read_image(series).GetSize() == (48, 48, 12)
    os.remove(series / "slice005.dcm")
    with pytest.raises(InputError) as info:
        read_image(series)
    assert str(info.value) == (
        f"volume '{series}': slice positions jump by 6.0 mm between files 'slice004.dcm' and 'slice006.dcm' "
        "where the others are 3.0 mm apart; is a slice missing?"
    )
    os.remove(series / "slice000.dcm")  # a shorter series is still a complete one
    os.remove(series / "slice001.dcm")
    os.remove(series / "slice002.dcm")
    os.remove(series / "slice003.dcm")
    os.remove(series / "slice004.dcm")
    assert read_image(series).GetSize() == (48, 48, 6)


def test_dicom_series_with_a_duplicated_position_is_refused(series):
    shutil.copy(series / "slice007.dcm", series / "slice007_copy.dcm")
    with pytest.raises(InputError, match="'slice007.dcm' and 'slice007_copy.dcm' lie at the same slice position"):
        read_image(series)


def test_dicom_files_are_ordered_by_position_not_by_name(series, volume):
    names = sorted(p.name for p in series.iterdir())
    for i, name in enumerate(names):
        os.rename(series / name, series / f"tmp{i}.dcm")
    for i in range(len(names)):
        os.rename(series / f"tmp{i}.dcm", series / f"{(7 * i) % len(names):02d}_{i}.dcm")
    image = read_image(series)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume))


def test_dicom_folder_with_two_series_is_refused(series):
    for k in range(3):
        retag(series / f"slice{k:03d}.dcm", **{"0020_000e": "1.2.3.4.5", "0008_103e": "Scout", "0020_0011": "1"})
    with pytest.raises(InputError) as info:
        read_image(series)
    message = str(info.value)
    assert "holds 2 DICOM series: 1.2.3.4.5 (series 1, 'Scout', 3 files); " in message
    assert "1.2.826.0.1.3680043.2.1125.1.99.1 (9 files)" in message
    assert message.endswith("Put each series in its own folder (one folder per case).")


def test_dicom_localizers_and_mixed_orientations_are_refused(series, tmp_path):
    scout = tmp_path / "scout"
    scout.mkdir()
    shutil.copy(series / "slice004.dcm", scout / "scout.dcm")
    retag(scout / "scout.dcm", **{"0008_0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    with pytest.raises(InputError, match=r"is a localizer \(scout\) series \(scout.dcm\)"):
        read_image(scout)
    retag(series / "slice006.dcm", **{"0020_0037": "1\\0\\0\\0\\0\\-1"})
    with pytest.raises(InputError, match="'slice006.dcm' have different slice orientations"):
        read_image(series)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scan")
    with pytest.raises(InputError, match="is a folder without a DICOM series"):
        read_image(empty)


def test_undecodable_tag_bytes_are_shown_escaped(series):
    for k in range(3):
        file = series / f"slice{k:03d}.dcm"
        retag(file, **{"0020_000e": "1.2.3.4.5", "0008_103e": "Leber AAAA"})
        file.write_bytes(file.read_bytes().replace(b"Leber AAAA", b"Leber A\x90\x07A"))
    with pytest.raises(InputError) as info:
        read_image(series)
    message = str(info.value)
    assert "1.2.3.4.5 ('Leber A\\x90\\x07A', 3 files)" in message
    message.encode("ascii")  # printable anywhere, whatever the terminal's encoding


def test_dicom_series_missing_a_slice_fails_alone_in_a_folder(tiny_model, volume, tmp_path, capsys):
    write_dicom_series(volume, tmp_path / "scans" / "complete")
    write_dicom_series(volume, tmp_path / "scans" / "gap")
    os.remove(tmp_path / "scans" / "gap" / "slice008.dcm")
    out = tmp_path / "out"
    rc = main(["score", "--model", str(tiny_model), "--input", str(tmp_path / "scans"), "--output", str(out),
               "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "gap: FAILED:" in err and "is a slice missing?" in err
    assert (out / "complete_summary.json").is_file() and not (out / "gap_summary.json").exists()


# Geometry that cannot be a CT or MR slice stack


def _geometry(size, spacing):
    return Geometry(tuple(size), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def test_impossible_geometry_is_refused_before_any_voxel_is_read(tmp_path):
    rng = np.random.default_rng(0)
    tiny = rng.normal(size=(8, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match="has axial slices of 8 x 8 pixels; a CT or MR slice has at least 16 x 16"):
        open_source(tiny, name="tiny")
    huge = sitk.GetImageFromArray(rng.integers(-1000, 1000, (8, 375, 375)).astype(np.int16))
    huge.SetSpacing((50.0, 50.0, 50.0))
    sitk.WriteImage(huge, str(tmp_path / "huge.nrrd"))
    with pytest.raises(InputError, match=r"18750 x 18750 mm .* larger than any scanner's field of view \(1000 mm\)"):
        open_source(tmp_path / "huge.nrrd")
    with pytest.raises(InputError, match="larger than any scanner's field of view"):
        open_source(tmp_path / "huge.nrrd", stream=False)
    array = rng.normal(size=(6, 32, 32)).astype(np.float32)
    with pytest.raises(InputError, match="spacing 0.5 x 0 x 2 mm; every spacing must be a positive"):
        open_source(array, _geometry((32, 32, 6), (0.5, 0.0, 2.0)), name="flat")
    with pytest.raises(InputError, match="only 0.016 x 0.016 mm .* in millimetres"):
        open_source(array, _geometry((32, 32, 6), (0.0005, 0.0005, 0.002)), name="metres")
    flat = Geometry((32, 32, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 1.0, 0, 0))
    with pytest.raises(InputError, match="invalid direction matrix"):
        open_source(array, flat, name="flat")
    assert open_source(array).num_slices == 6  # small synthetic volumes at 1 mm still open
    assert open_source(array[:, :16, :16]).rows == 16


# Case names and ROI files


def test_two_inputs_with_one_case_name_are_refused(volume, tmp_path):
    sitk.WriteImage(volume, str(tmp_path / "x.nrrd"))
    sitk.WriteImage(volume, str(tmp_path / "other.nrrd"))
    assert [c.name for c in discover_cases(tmp_path)] == ["other", "x"]
    sitk.WriteImage(volume, str(tmp_path / "X.nii.gz"))
    with pytest.raises(InputError) as info:
        discover_cases(tmp_path)
    assert "two inputs for case" in str(info.value) and "one would overwrite the other" in str(info.value)
    assert "x.nrrd'" in str(info.value) and "X.nii.gz'" in str(info.value)
    datalist = tmp_path / "list.json"
    (tmp_path / "a").mkdir()
    sitk.WriteImage(volume, str(tmp_path / "a" / "x.nrrd"))
    datalist.write_text(json.dumps({"training": [{"image": "x.nrrd"}, {"image": "a/x.nrrd"}]}))
    with pytest.raises(InputError, match="datalist .* holds two inputs for case 'x'"):
        discover_cases(datalist)


def test_one_roi_file_for_several_cases_is_refused(tmp_path):
    roi = tmp_path / "liver.seg.nrrd"
    roi.write_bytes(b"NRRD0004\n")
    case = Case("a", tmp_path / "a.nrrd")
    assert roi_for_case(case, roi, single=True) == roi
    with pytest.raises(InputError, match=r"ROI '.*liver.seg.nrrd' is one file, but the input holds several cases"):
        roi_for_case(case, roi, single=False)
    folder = tmp_path / "rois"
    folder.mkdir()
    (folder / "a.seg.nrrd").write_bytes(b"NRRD0004\n")
    assert roi_for_case(case, folder, single=False) == folder / "a.seg.nrrd"
    assert roi_for_case(case, folder, single=True) == folder / "a.seg.nrrd"
    assert roi_for_case(Case("b", tmp_path / "b.nrrd"), folder, single=False) is None
    with pytest.raises(InputError, match="does not exist"):
        roi_for_case(case, tmp_path / "missing", single=True)
