"""Training: repeatable, resumable after cancel, masks exclude slices, datalists; calibration maths."""

import json
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.calibration import MIN_SLICES_FOR_SCAN_LEVEL, calibrate, scan_level
from AnomalyFlagLib.errors import CancelledError, InputError
from AnomalyFlagLib.io.cases import discover_cases
from AnomalyFlagLib.phantom import make_phantom
from AnomalyFlagLib.training import recalibrate, recalibrate_held_out, train
from AnomalyFlagLib.training_slices import load_slices
from conftest import tiny_configs


def _weights(path):
    bundle = load_bundle(path)
    nets = {**bundle.backend.networks(), "statistics": bundle.statistics}
    return {f"{n}.{k}": v for n, net in nets.items() for k, v in net.state_dict().items()}


def _train(data, out, **kwargs):
    backend, architecture, options, preprocess = tiny_configs()
    kwargs.setdefault("log", lambda s: None)
    return train(data, out, backend, architecture, options, preprocess, device="cpu", **kwargs)


@pytest.mark.slow
def test_training_is_repeatable_with_a_seed(phantom_normal_dir, tiny_model, tmp_path):
    again = _train(phantom_normal_dir, tmp_path / "again")
    a, b = _weights(tiny_model), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "metadata.json").read_text())["threshold"] == pytest.approx(
        json.loads((tiny_model / "metadata.json").read_text())["threshold"]
    )


@pytest.mark.slow
def test_cancelled_training_resumes_to_the_same_model(phantom_normal_dir, tiny_model, tmp_path):
    out = tmp_path / "resumed"
    steps = []

    def progress(stage, step, total, info):
        steps.append((stage, step))

    with pytest.raises(CancelledError, match="resume"):
        _train(phantom_normal_dir, out, checkpoint_every=5, progress=progress, cancel=lambda: len(steps) >= 13)
    assert not out.exists(), "no bundle may appear for a cancelled run"
    assert (tmp_path / "resumed.partial" / "checkpoint.pt").is_file()
    _train(phantom_normal_dir, out, checkpoint_every=5, resume=True)
    a, b = _weights(tiny_model), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must match an uninterrupted run"
    assert not (tmp_path / "resumed.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("cancel_after", [13, 27], ids=["in-its-first-member", "in-its-second-member"])
def test_a_composite_backend_resumes_to_the_same_model(phantom_normal_dir, tmp_path, cancel_after):
    """The hybrid trains the restoration GAN (20 steps), then StyleGAN2 (12 + 12): a checkpoint holds both
    members' networks, and a resumed run skips the finished member and ends with the same weights."""
    backend, architecture, options, preprocess = tiny_configs("hybrid")
    run = dict(device="cpu", log=lambda s: None, checkpoint_every=5)
    whole = train(phantom_normal_dir, tmp_path / "whole", backend, architecture, options, preprocess, **run)
    steps = []
    stopping = dict(progress=lambda stage, *a: steps.append(stage), cancel=lambda: len(steps) >= cancel_after)
    with pytest.raises(CancelledError):
        train(phantom_normal_dir, tmp_path / "resumed", backend, architecture, options, preprocess, **stopping, **run)
    resumed_at = []
    resumed = train(phantom_normal_dir, tmp_path / "resumed", backend, architecture, options, preprocess,
                    resume=True, progress=lambda stage, *a: resumed_at.append(stage), **run)  # fmt: skip
    assert ("restoration" in resumed_at) == (cancel_after < 20), "a finished member is not trained again"
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and any(k.startswith("global_generator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must match an uninterrupted run"
    weight = a["statistics.slice_weight"]
    assert weight.shape == (1,) and 0 < float(weight) < 1e3 and float(weight) != 1.0, "fitted by the calibration"


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_from_other_settings(phantom_normal_dir, tmp_path):
    steps = []
    with pytest.raises(CancelledError):
        _train(phantom_normal_dir, tmp_path / "m", checkpoint_every=5, progress=lambda *a: steps.append(a),
               cancel=lambda: len(steps) > 3)  # fmt: skip
    assert (tmp_path / "m.partial" / "checkpoint.pt").is_file()
    with pytest.raises(InputError, match="other settings"):
        _train(phantom_normal_dir, tmp_path / "m", seed=99, resume=True)


@pytest.mark.slow
def test_time_budget_ends_training_and_still_calibrates(phantom_normal_dir, tmp_path):
    backend, architecture, options, preprocess = tiny_configs()
    options.iterations = 10**6
    started = time.monotonic()
    out = train(phantom_normal_dir, tmp_path / "budget", backend, architecture, options, preprocess,
                max_minutes=0.3, device="cpu", log=lambda s: None)  # fmt: skip
    elapsed = time.monotonic() - started
    meta = json.loads((out / "metadata.json").read_text())
    steps = meta["training"]["steps"][backend]
    assert 0 < steps < options.iterations, "the budget, not the iteration count, ended training"
    assert elapsed < 0.3 * 60 + 20, f"a 18 s budget took {elapsed:.0f} s"
    assert meta["calibration"]["threshold"] is not None and meta["training"]["max_minutes"] == 0.3
    # The recorded steps replay the run without a budget.
    options.iterations = steps
    again = train(phantom_normal_dir, tmp_path / "replay", backend, architecture, options, preprocess,
                  device="cpu", log=lambda s: None)  # fmt: skip
    assert json.loads((again / "metadata.json").read_text())["training"]["steps"][backend] == steps


@pytest.mark.slow
def test_training_from_a_single_patient_warns_and_calibrates_on_its_own_slices(tmp_path):
    make_phantom(num_slices=48, size=64, seed=3).save(tmp_path / "one", "patient")
    logs = []
    out = _train(tmp_path / "one", tmp_path / "model", log=logs.append)
    assert any("too few to hold one out" in line for line in logs)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["training"]["calibration_slices"] == 24 and meta["training"]["training_slices"] == 24
    assert "slice-level split" in meta["training"]["calibration_cases"]


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
    preprocess = tiny_configs()[3]
    slices = load_slices(cases, preprocess)
    assert len(slices) == image.GetSize()[2] - 2 and slices.excluded_slices == 2
    assert slices.images.shape[1:] == (1, 64, 64) and slices.images.dtype == torch.float16
    hu = sitk.GetArrayFromImage(image)  # slices keep Hounsfield units (windows are applied by the networks)
    assert float(slices.images.min()) >= hu.min() - 1 and float(slices.images.max()) <= hu.max() + 1
    assert float(slices.images.max()) > 300


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


@pytest.mark.slow
def test_recalibration_on_new_normal_data(tiny_model, phantom_normal_dir, tmp_path):
    out = recalibrate(tiny_model, phantom_normal_dir, tmp_path / "recal", target_rate=0.1, device="cpu",
                      log=lambda s: None)  # fmt: skip
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["calibration"]["target_false_flag_rate"] == 0.1
    assert meta["calibration"]["num_cases"] == 3
    assert meta["training"]["recalibrated_on"]["slices"] == 72
    assert _weights(out).keys() == _weights(tiny_model).keys()


def test_recalibration_on_its_held_out_slices_brings_an_older_bundle_to_this_flag_rule(
    tiny_model, phantom_normal_dir, phantom_anomalous_dir, tmp_path
):
    older = tmp_path / "older"
    shutil.copytree(tiny_model, older)
    meta = json.loads((older / "metadata.json").read_text())
    del meta["scoring"]["relative_to_scan"]  # made before flags were relative to the scan
    (older / "metadata.json").write_text(json.dumps(meta))
    assert load_bundle(older).scoring.relative_to_scan is False
    quiet = {"device": "cpu", "log": lambda s: None}
    with pytest.raises(InputError, match="not the training input"):
        recalibrate_held_out(older, phantom_anomalous_dir, **quiet)
    with pytest.raises(InputError, match="other held-out slices"):
        recalibrate_held_out(older, phantom_normal_dir, validation_fraction=0.6, **quiet)
    assert json.loads((older / "metadata.json").read_text()) == meta  # a refusal changes nothing
    from AnomalyFlagLib.cli import main

    assert main(["calibrate", "--model", str(older), "--input", str(phantom_normal_dir), "--held-out",
                 "--device", "cpu"]) == 0  # fmt: skip
    again, trained = load_bundle(older), load_bundle(tiny_model)
    assert again.scoring.relative_to_scan is True
    assert again.calibration == trained.calibration  # the slices and the rule that training calibrated with
    assert again.metadata["training"]["recalibrated_on"]["held_out_of_training"] is True


def test_calibration_flags_the_target_share_of_fresh_normal_slices():
    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 1, 4000)
    centre = 1.0 + 0.5 * positions  # scores drift along the body, as they do in CT
    scores = centre + rng.normal(0, 0.1, positions.size)
    residuals = rng.exponential(0.05, 100_000)
    cal = calibrate(scores, positions, residuals, num_cases=20, position_bins=5, target_false_flag_rate=0.05)
    assert len(cal.medians) == 5 and cal.medians[0] < cal.medians[-1]
    fresh_pos = rng.uniform(0, 1, 20000)
    fresh = 1.0 + 0.5 * fresh_pos + rng.normal(0, 0.1, fresh_pos.size)
    rate = float(np.mean(cal.normalise(fresh, fresh_pos) > cal.threshold))
    assert 0.035 < rate < 0.07
    assert cal.pixel_threshold == pytest.approx(np.quantile(residuals, 0.995), rel=1e-6)
    # A score far from normal is far above the threshold, whatever the rest of a test set holds.
    assert cal.normalise(np.array([3.0]), np.array([0.5]))[0] > 5 * cal.threshold


def test_scan_level_ignores_a_finding_under_half_the_scan_and_short_scans():
    normal = np.linspace(-1.5, 1.5, 48)
    assert scan_level(normal) == pytest.approx(0.0, abs=1e-9)
    assert scan_level(normal - 0.7) == 0.0  # a scan scoring low stays as it is
    assert scan_level(normal + 2.0) == pytest.approx(2.0)
    focal = normal.copy()
    focal[-20:] += 10.0  # a finding on 20 of 48 slices
    assert scan_level(focal) < 0.3
    short = np.full(MIN_SLICES_FOR_SCAN_LEVEL - 1, 4.0)
    assert scan_level(short) == 0.0 and scan_level(np.r_[short, 4.0, np.nan]) == 4.0


def test_calibration_relative_to_the_scan_is_not_set_by_one_subject_scoring_high_throughout():
    rng = np.random.default_rng(1)
    cases = np.repeat(np.arange(5), 48)  # 5 held-out subjects, as the quality benchmark holds out
    offsets = np.array([0.0, 0.0, 0.0, 0.0, 3.0])  # one of them scores high on every slice
    scores = offsets[cases] + rng.normal(0, 0.5, cases.size)
    positions = np.tile(np.linspace(0, 1, 48), 5)
    fresh = rng.normal(0, 0.5, (40, 48))  # new normal subjects
    fresh_positions = np.linspace(0, 1, 48)
    rates = {}
    for relative in (False, True):
        cal = calibrate(scores, positions, np.ones(100), num_cases=5, position_bins=1,
                        case_index=cases if relative else None)  # fmt: skip
        normalised = np.array([cal.normalise(f, fresh_positions) for f in fresh])
        if relative:
            normalised = normalised - np.array([scan_level(n) for n in normalised])[:, None]
        rates[relative] = float(np.mean(normalised > cal.threshold))
    assert rates[False] < 0.01  # the high subject holds the held-out top 5%: nothing is flagged
    assert 0.03 < rates[True] < 0.08


def test_calibration_refuses_too_little_or_broken_data():
    with pytest.raises(InputError, match="at least 10"):
        calibrate(np.ones(5), np.zeros(5), np.ones(5), num_cases=1)
    with pytest.raises(InputError, match="NaN"):
        calibrate(np.r_[np.ones(20), np.nan], np.zeros(21), np.ones(5), num_cases=1)


@pytest.mark.slow
def test_mri_model_is_invariant_to_the_scanner_intensity_scale(phantom_normal_dir, phantom_anomalous_dir, tmp_path):
    from AnomalyFlagLib.config import PreprocessConfig
    from AnomalyFlagLib.scoring import Scorer

    def as_mri(path, out, gain):  # an MR-like volume: arbitrary positive units
        image = sitk.ReadImage(str(path))
        array = (np.clip(sitk.GetArrayFromImage(image).astype(np.float32) + 1024, 0, None) * gain).astype(np.float32)
        mri = sitk.GetImageFromArray(array)
        mri.CopyInformation(image)
        sitk.WriteImage(mri, str(out))
        return out

    (tmp_path / "mri").mkdir()
    for i in range(3):
        as_mri(phantom_normal_dir / f"normal_00{i}.nrrd", tmp_path / "mri" / f"normal_00{i}.nrrd", 0.5)
    backend, architecture, options, _ = tiny_configs()
    preprocess = PreprocessConfig.for_modality("MR", image_size=64, fov_mm=None)
    model = train(tmp_path / "mri", tmp_path / "model", backend, architecture, options, preprocess, device="cpu",
                  log=lambda s: None)  # fmt: skip
    assert json.loads((model / "metadata.json").read_text())["preprocessing"]["modality"] == "MR"
    scorer = Scorer(model, device="cpu")
    case = phantom_anomalous_dir / "anomalous_000.nrrd"
    a = scorer.score(as_mri(case, tmp_path / "a.nrrd", 0.5))
    b = scorer.score(as_mri(case, tmp_path / "b.nrrd", 3.0))  # another scanner's scale
    np.testing.assert_allclose(a.slices["normalised"], b.slices["normalised"], rtol=1e-3, atol=1e-3)
