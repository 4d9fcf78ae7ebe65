"""Tests of the procedural CT phantom and of anomaly insertion (fast, CPU only, no downloads)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "AnomalyFlag"))

from AnomalyFlagLib.phantom import (  # noqa: E402
    ANOMALY_KINDS,
    MATERIAL_CHANGE_HU,
    ORGAN_LABELS,
    Phantom,
    insert_anomaly,
    make_phantom,
    make_phantom_set,
)

SHAPE = dict(num_slices=48, size=96)


@pytest.fixture(scope="module")
def normal():
    return make_phantom(seed=3, **SHAPE)


def _median_hu(phantom, organ):
    return float(np.median(phantom.image[phantom.organs == ORGAN_LABELS[organ]]))


def test_types_shapes_and_labels(normal):
    assert isinstance(normal, Phantom)
    assert normal.image.dtype == np.int16 and normal.image.shape == (48, 96, 96)
    assert normal.anomaly_mask.dtype == np.uint8 and not normal.anomaly_mask.any()
    assert normal.organs.dtype == np.uint8
    assert set(np.unique(normal.organs)) == set(ORGAN_LABELS.values())
    assert normal.anomalies == []
    assert normal.spacing == (1.5, 1.5, 3.0)


def test_organ_hounsfield_units(normal):
    assert np.median(normal.image[normal.organs == 0]) < -950
    assert 45 <= _median_hu(normal, "liver") <= 75
    assert 35 <= _median_hu(normal, "spleen") <= 65
    for kidney in ("kidney_left", "kidney_right"):  # enhanced cortex ~150 HU around a ~90 HU medulla
        values = normal.image[normal.organs == ORGAN_LABELS[kidney]]
        assert 60 <= np.median(values) <= 170
        assert 120 <= np.percentile(values, 90) <= 200
    aorta = normal.image[normal.organs == ORGAN_LABELS["aorta"]]  # small: partial volume at its edge
    assert 140 <= np.median(aorta) <= 230 and 180 <= np.percentile(aorta, 90) <= 260
    assert _median_hu(normal, "bone") >= 350
    assert normal.image[normal.organs == ORGAN_LABELS["bone"]].max() >= 750  # cortical bone
    body = normal.image[normal.organs == ORGAN_LABELS["body"]]
    assert np.mean((body > -130) & (body < -60)) > 0.1  # subcutaneous and visceral fat
    assert np.mean((body > 20) & (body < 70)) > 0.1  # muscle and bowel
    # noise: neighbouring liver voxels differ by roughly 10-30 HU
    liver = normal.organs == ORGAN_LABELS["liver"]
    inner = liver[:, 1:-1, 1:-1] & liver[:, 2:, 1:-1] & liver[:, :-2, 1:-1]
    values = normal.image[:, 1:-1, 1:-1][inner].astype(float)
    assert 5 < values.std() < 35


def test_anatomy_changes_along_z(normal):
    counts = {
        name: np.array([(normal.organs[k] == value).sum() for k in range(normal.organs.shape[0])])
        for name, value in ORGAN_LABELS.items()
    }
    # liver is large at the top (high z index = superior) and absent at the bottom
    assert counts["liver"][-8:].mean() > 5 * max(counts["liver"][:5].mean(), 1)
    assert counts["liver"][:3].sum() == 0
    # kidneys sit in the lower-middle slices, spleen in the upper ones
    kidney = counts["kidney_left"] + counts["kidney_right"]
    assert kidney[10:25].mean() > 0 and kidney[-5:].sum() == 0
    assert counts["spleen"][:15].sum() == 0 and counts["spleen"][35:].sum() > 0
    # aorta and spine run through every slice; the body outline changes smoothly
    assert (counts["aorta"] > 0).all()
    body_area = (normal.organs > 0).sum(axis=(1, 2)).astype(float)
    assert np.abs(np.diff(body_area)).max() < 0.05 * body_area.mean()
    assert body_area.max() - body_area.min() > 0.02 * body_area.mean()


def test_deterministic_for_a_seed_and_different_between_seeds(normal):
    again = make_phantom(seed=3, **SHAPE)
    np.testing.assert_array_equal(again.image, normal.image)
    np.testing.assert_array_equal(again.organs, normal.organs)
    other = make_phantom(seed=4, **SHAPE)
    assert not np.array_equal(other.organs, normal.organs)
    assert np.abs(other.image.astype(int) - normal.image).mean() > 20
    with_anomalies = [make_phantom(seed=5, anomalies=list(ANOMALY_KINDS), **SHAPE) for _ in range(2)]
    np.testing.assert_array_equal(with_anomalies[0].image, with_anomalies[1].image)
    np.testing.assert_array_equal(with_anomalies[0].anomaly_mask, with_anomalies[1].anomaly_mask)
    assert with_anomalies[0].anomalies == with_anomalies[1].anomalies


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_phantom_anomaly_changes_image_where_the_mask_says(normal, kind):
    # same seed -> same anatomy and noise, so the difference is the anomaly alone
    phantom = make_phantom(seed=3, anomalies=[kind], **SHAPE)
    mask = phantom.anomaly_mask.astype(bool)
    if kind == "fluid":  # fluid displaces tissue: the organ map says body there, unchanged elsewhere
        assert (phantom.organs[mask] == ORGAN_LABELS["body"]).all()
        np.testing.assert_array_equal(phantom.organs[~mask], normal.organs[~mask])
    else:
        np.testing.assert_array_equal(phantom.organs, normal.organs)
    assert mask.any()
    info = phantom.anomalies[0]
    assert info["kind"] == kind
    assert info["slices"] == sorted(set(np.flatnonzero(mask.any(axis=(1, 2))).tolist()))
    assert mask[tuple(info["centre"])]
    delta = phantom.image.astype(float) - normal.image.astype(float)
    near = mask.copy()
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    near[:, :, 1:] |= mask[:, :, :-1]
    near[:, :, :-1] |= mask[:, :, 1:]
    if kind == "metal_stent":
        assert np.abs(delta[~near]).max() <= MATERIAL_CHANGE_HU + 10
        assert phantom.image[mask].max() >= 2400
        assert info["region"] == "aorta"
        assert (phantom.organs[phantom.image >= 2400] == ORGAN_LABELS["aorta"]).mean() > 0.5
    else:
        inside = delta[mask]
        # the lesions' soft edge changes voxels just outside the mask by less than half the shift
        assert np.abs(delta[~mask]).max() <= 0.5 * abs(np.median(inside)) + 1
        assert np.abs(delta[~near]).max() <= 0.5 * abs(np.median(inside)) + 1
        if kind == "hypodense_lesion":
            assert np.median(inside) <= -25
            assert 0 <= np.median(phantom.image[mask]) <= 45
        elif kind == "hyperdense_lesion":
            assert 60 <= np.median(inside) <= 130
        else:  # fluid: water-like HU in a crescent
            assert -5 <= np.median(phantom.image[mask]) <= 25
            assert info["region"] == "peritoneum"
    if kind.endswith("lesion"):
        assert info["region"] in ("liver", "spleen", "kidney_left", "kidney_right")
        organ = phantom.organs == ORGAN_LABELS[info["region"]]
        assert organ[mask].all()


def test_several_anomalies_union_mask():
    phantom = make_phantom(seed=8, anomalies=["hypodense_lesion", {"kind": "fluid"}, "metal_stent"], **SHAPE)
    assert [a["kind"] for a in phantom.anomalies] == ["hypodense_lesion", "fluid", "metal_stent"]
    touched = sorted({k for a in phantom.anomalies for k in a["slices"]})
    assert touched == np.flatnonzero(phantom.anomaly_mask.any(axis=(1, 2))).tolist()


def _smooth_volume():
    """A non-phantom 'CT': a soft-tissue ellipsoid body with a smooth gradient, in air, float32."""
    z, y, x = np.meshgrid(np.arange(20), np.arange(64), np.arange(64), indexing="ij")
    body = ((y - 32) / 26.0) ** 2 + ((x - 32) / 30.0) ** 2 < 1.0
    image = np.where(body, 40.0 + 0.5 * (x - 32) + 0.2 * z, -1000.0).astype(np.float32)
    return image, body


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_insert_anomaly_on_a_non_phantom_volume(kind):
    image, body = _smooth_volume()
    original = image.copy()
    region = np.zeros_like(body)
    region[5:15, 20:44, 12:32] = True
    region &= body
    new, mask = insert_anomaly(image, kind, np.random.default_rng(1), region_mask=region, spacing=(1, 1, 2))
    np.testing.assert_array_equal(image, original)  # input untouched
    assert new.dtype == image.dtype and new.shape == image.shape
    assert mask.dtype == np.uint8 and mask.any()
    mask = mask.astype(bool)
    delta = new - image
    if kind == "metal_stent":
        assert new[mask].max() >= 2500
        assert np.abs(delta[~mask]).max() <= MATERIAL_CHANGE_HU + 1e-3
        metal = new >= 2500
        assert region[metal].any()
        assert (np.abs(delta[~body]) == 0).all()  # streaks only inside the body
    elif kind == "fluid":
        assert (delta[~mask] == 0).all()
        assert region[mask].all()
        assert -15 <= np.median(new[mask]) <= 35
    else:
        assert region[mask].all()  # lesions stay in the region
        assert (np.abs(delta[~region]) == 0).all()
        sign = -1 if kind == "hypodense_lesion" else 1
        assert sign * np.median(delta[mask]) >= 25
        assert np.abs(delta[~mask]).max() <= 0.5 * np.abs(np.median(delta[mask])) + 1e-3


def test_insert_anomaly_keeps_integer_dtype_and_defaults_to_the_body():
    image, body = _smooth_volume()
    image = image.astype(np.int16)
    new, mask, info = insert_anomaly(
        image, "hyperdense_lesion", np.random.default_rng(2), spacing=(1, 1, 2), radius_mm=5, return_info=True
    )
    assert new.dtype == np.int16
    assert body[mask.astype(bool)].all()
    assert info["kind"] == "hyperdense_lesion" and body[tuple(info["centre"])]
    a, _ = insert_anomaly(image, "fluid", np.random.default_rng(3))
    b, _ = insert_anomaly(image, "fluid", np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_insert_anomaly_rejects_bad_input():
    image, body = _smooth_volume()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        insert_anomaly(image, "tumour", rng)
    with pytest.raises(ValueError, match="region_mask shape"):
        insert_anomaly(image, "fluid", rng, region_mask=body[:5])
    with pytest.raises(ValueError, match="no voxel"):
        insert_anomaly(image, "hypodense_lesion", rng, region_mask=np.zeros_like(body))


def test_save_writes_readable_nrrds_with_geometry(tmp_path):
    phantom = make_phantom(num_slices=12, size=48, spacing=(0.8, 0.8, 2.5), seed=1, anomalies=["hyperdense_lesion"])
    paths = phantom.save(tmp_path, "case")
    assert {k: p.name for k, p in paths.items()} == {
        "image": "case.nrrd",
        "anomaly": "case_anomaly.nrrd",
        "organs": "case_organs.nrrd",
    }
    image = sitk.ReadImage(str(paths["image"]))
    assert image.GetSize() == (48, 48, 12)
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.8, 2.5))
    np.testing.assert_allclose(image.GetOrigin(), (-18.8, -18.8, -13.75))
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.image)
    mask = sitk.ReadImage(str(paths["anomaly"]))
    assert mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), phantom.anomaly_mask)
    organs = sitk.ReadImage(str(paths["organs"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(organs), phantom.organs)
    np.testing.assert_allclose(organs.GetOrigin(), image.GetOrigin())


def test_make_phantom_set(tmp_path):
    normal = make_phantom_set(tmp_path / "n", 2, anomalous=False, seed=0, num_slices=10, size=48)
    anomalous = make_phantom_set(tmp_path / "a", 3, anomalous=True, seed=0, num_slices=10, size=48)
    assert [c["name"] for c in normal] == ["normal_000", "normal_001"]
    assert len(anomalous) == 3
    for case in normal:
        assert case["anomalies"] == []
        assert not sitk.GetArrayFromImage(sitk.ReadImage(str(case["anomaly"]))).any()
    for case in anomalous:
        assert 1 <= len(case["anomalies"]) <= 3
        assert all(a["kind"] in ANOMALY_KINDS for a in case["anomalies"])
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(case["anomaly"]))).any()
        assert case["image"].exists() and case["organs"].exists()
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == sorted(
        f"normal_00{i}{suffix}.nrrd" for i in range(2) for suffix in ("", "_anomaly", "_organs")
    )
    again = make_phantom_set(tmp_path / "a2", 3, anomalous=True, seed=0, num_slices=10, size=48)
    assert [c["anomalies"] for c in again] == [c["anomalies"] for c in anomalous]
