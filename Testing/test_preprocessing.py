"""Network inputs: windows that show soft tissue and metal, body centring that maps back exactly, MRI
percentile normalisation, and the generic training corruptions."""

import numpy as np
import pytest
import torch
from AnomalyFlagLib.config import PreprocessConfig
from AnomalyFlagLib.detectors.corruptions import FAMILIES, corrupt
from AnomalyFlagLib.io.slice_source import open_source
from AnomalyFlagLib.phantom import make_phantom
from AnomalyFlagLib.preprocessing import InputSpec, SlicePreprocessor, volume_reference


def test_default_ct_windows_show_a_30_hu_lesion_and_a_stent():
    spec = InputSpec.from_config(PreprocessConfig())
    hu = torch.tensor([60.0, 30.0, 950.0, 2500.0, -1000.0, 3071.0]).view(1, 1, 1, -1)
    liver, lesion, bone, metal, air, top = spec.channels(hu)[0, :, 0].T
    assert spec.num_channels == 3
    # Soft tissue: 30 HU is 0.15 of the window's [-1, 1] span (the old -1000..1000 window gave 0.03).
    assert liver[0] - lesion[0] == pytest.approx(0.15)
    # Metal stands apart from cortical bone in the metal window; in the others both saturate or nearly so.
    assert metal[2] - bone[2] > 1.4 and bone[0] == metal[0] == 1.0
    assert air.tolist() == [-1.0, -1.0, -1.0] and top[2] == 1.0
    assert spec.intensity_unit == 200.0


def test_body_centring_puts_the_body_in_the_middle_and_maps_back_exactly():
    config = PreprocessConfig(image_size=64, fov_mm=192.0)
    pre = SlicePreprocessor(config)
    slab = np.full((2, 100, 120), -1024.0, dtype=np.float32)
    slab[0, 10:30, 80:110] = 40.0  # a body off to one side
    slab[1, 60:90, 5:25] = 40.0
    x, placement = pre.to_model(slab, 2.0, 2.0)  # 2 mm pixels -> 3 mm model pixels
    assert x.shape == (2, 1, 64, 64)
    for i in range(2):
        ys, xs = np.nonzero(x[i, 0].numpy() > -500)
        assert abs(ys.mean() - 31.5) < 2 and abs(xs.mean() - 31.5) < 2
    # A map of ones at model resolution lands on the body's pixels of the original grid.
    back = pre.to_slice_grid(torch.ones(2, 64, 64), placement, 100, 120).numpy()
    assert back.shape == (2, 100, 120)
    assert back[0, 15:25, 85:105].min() > 0.99 and back[1, 65:85, 8:22].min() > 0.99
    assert back[0, 90:, :20].max() == 0.0, "far from the square nothing is painted"


def test_body_mask_is_the_patient_with_lungs_filled_and_without_the_table():
    slab = torch.full((1, 1, 80, 80), -1024.0)
    slab[0, 0, 10:50, 10:70] = 40.0  # trunk
    slab[0, 0, 20:40, 18:35] = -850.0  # a lung, enclosed
    slab[0, 0, 60:66, 2:78] = 100.0  # the table, apart from the patient
    body = InputSpec.from_config(PreprocessConfig()).body(slab)[0, 0]
    assert body[20:40, 18:35].all(), "the lung is inside the body"
    assert body[10:50, 10:70].all() and not body[58:70].any(), "the table is not"
    # Centring follows the patient, not the patient and the table together.
    x, _ = SlicePreprocessor(PreprocessConfig(image_size=64, fov_mm=160.0)).to_model(slab[:, 0].numpy(), 2.0, 2.0)
    trunk_rows = np.nonzero((np.abs(x[0, 0].numpy() - 40.0) < 1).any(axis=1))[0]
    assert abs(trunk_rows.mean() - 31.5) < 2


def test_centring_can_be_switched_off():
    pre = SlicePreprocessor(PreprocessConfig(image_size=64, fov_mm=192.0, centre_on_body=False))
    slab = np.full((1, 96, 96), -1024.0, dtype=np.float32)
    slab[0, 0:20, 0:20] = 40.0
    _, placement = pre.to_model(slab, 2.0, 2.0)
    assert placement.scaled_shape == (64, 64) and placement.tops == [0] and placement.lefts == [0]


def test_mri_intensities_are_normalised_by_the_volume_percentiles():
    config = PreprocessConfig.for_modality("MR", image_size=32, fov_mm=None)
    assert config.windows == [[0.0, 1.0]] and config.body_threshold == 0.1
    rng = np.random.default_rng(0)
    volume = (rng.gamma(2.0, 300.0, (6, 32, 32)) * np.linspace(0, 1, 32)).astype(np.float32)  # no resampling
    source = open_source(volume * 7.0 + 100.0)  # another scanner's scale and offset
    scaled = open_source(volume)
    ref, ref_scaled = volume_reference(source, config), volume_reference(scaled, config)
    pre = SlicePreprocessor(config)
    a, _ = pre.to_model(volume * 7.0 + 100.0, 1.0, 1.0, ref)
    b, _ = pre.to_model(volume, 1.0, 1.0, ref_scaled)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert float(np.quantile(b.numpy(), 0.99)) == pytest.approx(1.0, abs=0.1)  # percentiles of a subsample
    with pytest.raises(ValueError, match="intensity reference"):
        pre.to_model(volume, 1.0, 1.0)
    assert volume_reference(source, PreprocessConfig()) is None, "CT needs no reference: HU are absolute"


def test_invalid_preprocessing_is_refused():
    for bad in ({"windows": [[100.0, 0.0]]}, {"image_size": 100}, {"modality": "PET"}, {"fov_mm": -1.0}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad).validate()


def test_corruptions_stay_in_the_body_and_label_what_changed():
    phantom = make_phantom(num_slices=16, size=64, seed=4)
    x = torch.from_numpy(phantom.image.astype(np.float32))[:, None]
    spec = InputSpec.from_config(PreprocessConfig(image_size=64, fov_mm=None))
    body = spec.body(x)
    gen = torch.Generator().manual_seed(0)
    for family in range(1, len(FAMILIES)):
        mix = [0.0] * len(FAMILIES)
        mix[family] = 1.0
        out, label = corrupt(x, body, spec.intensity_unit, gen, tuple(mix), floor=spec.pad_value)
        changed = (out - x).abs() > 1.0
        assert changed.any(), FAMILIES[family]
        assert not (changed & ~body).any(), f"{FAMILIES[family]} changed pixels outside the body"
        assert label.any() and not (label & ~torch.nn.functional.max_pool2d(changed.float(), 3, 1, 1).bool()).any()
        assert float(out.min()) >= spec.pad_value
    clean, label = corrupt(x, body, spec.intensity_unit, gen, (1.0, 0, 0, 0, 0))
    assert torch.equal(clean, x) and not label.any()


def test_slices_far_larger_than_the_model_field_of_view_are_refused_before_resampling():
    from AnomalyFlagLib.errors import InputError

    pre = SlicePreprocessor(PreprocessConfig(image_size=64, fov_mm=50.0))
    pre.check_fits(512, 512, 0.7, 0.7, "volume 'knee.nrrd'")  # 358 mm: 7 fields of view, still accepted
    with pytest.raises(InputError, match=r"volume 'big.nrrd' has slices of 973 x 973 mm.*1245 x 1245 pixels"):
        pre.check_fits(512, 512, 1.9, 1.9, "volume 'big.nrrd'")


def test_the_corruption_mix_gives_thin_bands_their_share_and_keeps_the_others_in_proportion():
    from AnomalyFlagLib.detectors.corruptions import OTHER_FAMILY_SHARES, corruption_mix

    mix = corruption_mix(0.15, 0.18)
    assert len(mix) == len(FAMILIES) and abs(sum(mix) - 1) < 1e-12
    assert mix[0] == 0.15 and abs(mix[FAMILIES.index("thin_bands")] - 0.85 * 0.18) < 1e-12
    no_bands = corruption_mix(0.15, 0.0)
    assert no_bands[FAMILIES.index("thin_bands")] == 0
    others = [no_bands[FAMILIES.index(f)] for f in ("coarse_noise", "intensity_blobs", "foreign_patches")]
    assert np.allclose(np.array(others) / sum(others), np.array(OTHER_FAMILY_SHARES) / sum(OTHER_FAMILY_SHARES))


def test_the_smallest_blob_follows_min_coverage():
    x = torch.zeros(64, 1, 64, 64)
    body = torch.ones_like(x, dtype=torch.bool)
    blobs = (0.0, 0.0, 1.0, 0.0, 0.0)

    def smallest(min_coverage):  # of the blobs that changed anything (a flat top of the field can leave none)
        gen = torch.Generator().manual_seed(0)
        out, _ = corrupt(x, body, 200.0, gen, blobs, min_coverage=min_coverage)
        areas = ((out - x).abs() > 1.0).float().mean(dim=(1, 2, 3))
        return float(areas[areas > 0].min())

    assert smallest(0.002) < 0.005 <= smallest(0.02)


def test_restoration_options_check_the_corruption_settings():
    from AnomalyFlagLib.detectors.restoration import RestorationOptions

    for bad, field in (({"band_share": 1.5}, "band_share"), ({"min_blob_coverage": 0.0}, "min_blob_coverage"),
                       ({"min_blob_coverage": 0.2}, "min_blob_coverage")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            RestorationOptions(**bad).validate()
