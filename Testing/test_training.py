"""Training: repeatable, resumable after cancel, masks exclude slices, datalists; calibration maths."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.calibration import calibrate
from AnomalyFlagLib.datasets import discover_cases, load_slices
from AnomalyFlagLib.errors import CancelledError, InputError
from AnomalyFlagLib.training import recalibrate, train
from conftest import tiny_configs


def _weights(path):
    bundle = load_bundle(path)
    return {f"{n}.{k}": v for n, net in bundle.detector.networks().items() for k, v in net.state_dict().items()}


def _train(data, out, **kwargs):
    model, preprocess, options = tiny_configs()
    return train(data, out, model, preprocess, options=options, device="cpu", log=lambda s: None, **kwargs)


def test_training_is_repeatable_with_a_seed(phantom_normal_dir, tiny_model, tmp_path):
    again = _train(phantom_normal_dir, tmp_path / "again")
    a, b = _weights(tiny_model), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "metadata.json").read_text())["threshold"] == pytest.approx(
        json.loads((tiny_model / "metadata.json").read_text())["threshold"]
    )


def test_cancelled_training_resumes_to_the_same_model(phantom_normal_dir, tiny_model, tmp_path):
    out = tmp_path / "resumed"
    steps = []

    def progress(stage, step, total, info):
        steps.append((stage, step))

    model, preprocess, options = tiny_configs()
    options.checkpoint_every = 5
    with pytest.raises(CancelledError, match="resume"):
        train(phantom_normal_dir, out, model, preprocess, options=options, device="cpu", log=lambda s: None,
              progress=progress, cancel=lambda: len(steps) >= 13)  # fmt: skip
    assert not out.exists(), "no bundle may appear for a cancelled run"
    assert (tmp_path / "resumed.partial" / "checkpoint.pt").is_file()
    train(phantom_normal_dir, out, model, preprocess, options=options, device="cpu", log=lambda s: None, resume=True)
    a, b = _weights(tiny_model), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must match an uninterrupted run"
    assert not (tmp_path / "resumed.partial").exists()


def test_resume_refuses_a_checkpoint_from_other_settings(phantom_normal_dir, tmp_path):
    model, preprocess, options = tiny_configs()
    options.checkpoint_every = 5
    steps = []
    with pytest.raises(CancelledError):
        train(phantom_normal_dir, tmp_path / "m", model, preprocess, options=options, device="cpu",
              log=lambda s: None, progress=lambda *a: steps.append(a), cancel=lambda: len(steps) > 3)  # fmt: skip
    assert (tmp_path / "m.partial" / "checkpoint.pt").is_file()
    options.seed = 99
    with pytest.raises(InputError, match="other settings"):
        train(phantom_normal_dir, tmp_path / "m", model, preprocess, options=options, device="cpu",
              log=lambda s: None, resume=True)  # fmt: skip


def test_masked_slices_are_excluded(phantom_normal_dir, tmp_path):
    image = sitk.ReadImage(str(phantom_normal_dir / "normal_000.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "ct_image.nrrd"))
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    mask[10:20, 10:20, 5] = 1
    mask[10:20, 10:20, 6] = 1
    sitk.WriteImage(mask, str(tmp_path / "ct_label.nrrd"))
    cases = discover_cases(tmp_path)
    assert len(cases) == 1 and cases[0].mask == tmp_path / "ct_label.nrrd"
    model, preprocess, _ = tiny_configs()
    slices = load_slices(cases, preprocess, model.image_size)
    assert len(slices) == image.GetSize()[2] - 2 and slices.excluded_slices == 2
    assert slices.images.shape[1:] == (1, 64, 64) and slices.images.dtype == torch.float16
    assert float(slices.images.min()) >= -1 and float(slices.images.max()) <= 1


def test_datalist_input(phantom_normal_dir, tmp_path):
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": str(phantom_normal_dir / "normal_001.nrrd")}],
                                    "validation": [str(phantom_normal_dir / "normal_002.nrrd")]}))  # fmt: skip
    cases = discover_cases(datalist)
    assert [c.name for c in cases] == ["normal_001", "normal_002"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        discover_cases(bad)


def test_recalibration_on_new_normal_data(tiny_model, phantom_normal_dir, tmp_path):
    out = recalibrate(tiny_model, phantom_normal_dir, tmp_path / "recal", target_rate=0.1, device="cpu",
                      log=lambda s: None)  # fmt: skip
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["calibration"]["target_false_flag_rate"] == 0.1
    assert meta["calibration"]["num_cases"] == 3
    assert meta["training"]["recalibrated_on"]["slices"] == 72
    assert _weights(out).keys() == _weights(tiny_model).keys()


def test_calibration_flags_the_target_share_of_fresh_normal_slices():
    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 1, 4000)
    centre = 1.0 + 0.5 * positions  # scores drift along the body, as they do in CT
    combined = centre + rng.normal(0, 0.1, positions.size)
    residuals = rng.exponential(0.05, 100_000)
    cal = calibrate(combined, positions, residuals, num_cases=20, position_bins=5, target_false_flag_rate=0.05)
    assert len(cal.medians) == 5 and cal.medians[0] < cal.medians[-1]
    fresh_pos = rng.uniform(0, 1, 20000)
    fresh = 1.0 + 0.5 * fresh_pos + rng.normal(0, 0.1, fresh_pos.size)
    rate = float(np.mean(cal.normalise(fresh, fresh_pos) > cal.threshold))
    assert 0.035 < rate < 0.07
    assert cal.pixel_threshold == pytest.approx(np.quantile(residuals, 0.995), rel=1e-6)
    # A score far from normal is far above the threshold, whatever the rest of a test set holds.
    assert cal.normalise(np.array([3.0]), np.array([0.5]))[0] > 5 * cal.threshold


def test_calibration_refuses_too_little_or_broken_data():
    with pytest.raises(InputError, match="at least 10"):
        calibrate(np.ones(5), np.zeros(5), np.ones(5), num_cases=1)
    with pytest.raises(InputError, match="NaN"):
        calibrate(np.r_[np.ones(20), np.nan], np.zeros(21), np.ones(5), num_cases=1)
