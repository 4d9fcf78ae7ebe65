"""metadata.json against the bundle schema: every bad value gives one BundleError naming the bundle, the
key path and the problem, before any tensor file is read; whatever loads also scores (info and score agree)."""

import copy
import json
import math
import random
import shutil
import time
import traceback

import pytest
import SimpleITK as sitk
import torch
from AnomalyFlagLib.bundle import METADATA_FILE, load_bundle
from AnomalyFlagLib.cli import EXIT_USAGE, main
from AnomalyFlagLib.errors import BundleError


@pytest.fixture(scope="module")
def base_meta(tiny_model):
    return json.loads((tiny_model / METADATA_FILE).read_text())


@pytest.fixture()
def bundle_dir(tiny_model, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_model, dst)
    return dst


@pytest.fixture(scope="module")
def small_scan(phantom_normal_dir, tmp_path_factory):
    """Four slices of a normal phantom: enough to score, quick to score hundreds of times."""
    image = sitk.ReadImage(str(phantom_normal_dir / "normal_000.nrrd"))
    path = tmp_path_factory.mktemp("scan") / "small.nrrd"
    sitk.WriteImage(image[:, :, 10:14], str(path))
    return path


def _write(bundle, meta):
    (bundle / METADATA_FILE).write_text(json.dumps(meta))  # allow_nan: NaN and Infinity tokens too


def _set(meta, path, value):
    target = meta
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


DELETE = "<delete>"
CASES = [
    # (path, value or DELETE, the key path and problem the message must name)
    (("preprocessing", "windows", 1, 0), "-1000", r"preprocessing\.windows\[1\]\[0\]: expected a finite number"),
    (("preprocessing", "fov_mm"), True, r"preprocessing\.fov_mm: expected a finite number or null, found true"),
    (("preprocessing", "fov_mm"), 1e308, r"preprocessing\.fov_mm: expected 10 to 2000 mm"),
    (("preprocessing", "image_size"), DELETE, r"preprocessing\.image_size: missing"),
    (("preprocessing", "image_size"), 64.0, r"preprocessing\.image_size: expected an integer, found 64\.0"),
    (("preprocessing", "windows", 0), [240.0, -160.0], r"preprocessing\.windows\[0\]: .*low < high"),
    (("preprocessing", "centre_on_body"), "no", r"preprocessing\.centre_on_body: expected true or false"),
    (("scoring", "neighbour_slices"), True, r"scoring\.neighbour_slices: expected an integer, found true"),
    (("scoring", "map_sigma_mm"), float("nan"), r"scoring\.map_sigma_mm: expected a finite number, found NaN"),
    (("scoring", "calibration_bins"), 0, r"scoring\.calibration_bins: expected 1 to"),
    (("scoring", "position_bins"), DELETE, r"scoring\.position_bins: missing"),
    (("calibration", "bin_edges", 1), "1", r"calibration\.bin_edges\[1\]: expected a finite number"),
    (("calibration", "bin_edges"), [1.0, 0.0], r"calibration\.bin_edges\[0\]: expected 0"),
    (("calibration", "scales", 0), 0, r"calibration\.scales\[0\]: expected above 0"),
    (("calibration", "pixel_threshold"), -1.0, r"calibration\.pixel_threshold: expected"),
    (("calibration", "target_false_flag_rate"), 1.5, r"calibration\.target_false_flag_rate: expected a rate"),
    (("calibration", "num_slices"), 24.5, r"calibration\.num_slices: expected an integer"),
    (("threshold",), 0.123, r"threshold: expected calibration\.threshold"),
    (("restoration", "training_options", "feature_weight"), True, r"training_options\.feature_weight: expected a"),
    (("restoration", "architecture", "condition_on_position"), "no", r"architecture\.condition_on_position"),
    (("restoration", "architecture", "base_width"), 10**12, r"restoration\.architecture\.base_width: expected 1 to"),
    (("components", 2, "weight"), 5.0, r"components\[2\]\.weight: expected 1, found 5\.0"),
    (("weights",), "encoder.safetensors", r"weights: expected an object"),
    (("weights", "critic", "file"), 5, r"weights\.critic\.file: expected a string, found 5"),
    (("weights", "critic", "sha256"), "ABC", r"weights\.critic\.sha256: expected a SHA-256"),
    (("weights", "map_statistics"), DELETE, r"weights\.map_statistics: missing"),
    (("weights", "extra"), {"file": "x.safetensors", "sha256": "0" * 64}, r"weights\.extra: not a tensor file"),
    (("training",), "abc", r"training: expected an object or null"),
    (("versions", "torch"), 2.1, r"versions\.torch: expected a string"),
    (("position_reference",), "table", r"position_reference: expected \"scan\""),
    (("dual_energy",), True, r"unknown bundle metadata fields \['dual_energy'\]"),
    (("format_version",), -3, r"format_version: expected 2, found -3"),
    (("format_version",), True, r"format_version: expected 2, found true"),
]


@pytest.mark.parametrize(
    "path, value, message", CASES, ids=[".".join(map(str, c[0])) + f"={c[1]!r}"[:30] for c in CASES]
)
def test_a_bad_value_names_the_bundle_the_key_and_the_problem(bundle_dir, base_meta, path, value, message):
    meta = copy.deepcopy(base_meta)
    if value == DELETE:
        target = meta
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    else:
        _set(meta, path, value)
    _write(bundle_dir, meta)
    for tensors in bundle_dir.glob("*.safetensors"):
        tensors.unlink()  # validation comes before any tensor file is read
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle_dir)
    text = str(caught.value)
    assert str(bundle_dir / METADATA_FILE) in text and "\n" not in text


def test_a_bundle_from_before_calibration_bins_loads_with_one_bin(bundle_dir, base_meta):
    meta = copy.deepcopy(base_meta)
    del meta["scoring"]["calibration_bins"]  # older bundles record the per-pixel bins only
    _write(bundle_dir, meta)
    bundle = load_bundle(bundle_dir)
    assert bundle.scoring.calibration_bins == 1 and bundle.scoring.position_bins == meta["scoring"]["position_bins"]


def test_a_bundle_from_before_relative_flags_keeps_its_absolute_threshold(bundle_dir, base_meta):
    assert base_meta["scoring"]["relative_to_scan"] is True  # what training writes now
    meta = copy.deepcopy(base_meta)
    del meta["scoring"]["relative_to_scan"]  # its threshold was calibrated on scores not relative to the scan
    _write(bundle_dir, meta)
    assert load_bundle(bundle_dir).scoring.relative_to_scan is False


def test_a_newer_format_asks_to_upgrade(bundle_dir, base_meta):
    meta = dict(base_meta, format_version=base_meta["format_version"] + 1)
    _write(bundle_dir, meta)
    with pytest.raises(BundleError, match="made by a newer AnomalyFlag.*Update AnomalyFlag"):
        load_bundle(bundle_dir)


def test_info_and_score_agree_on_a_bundle_without_normal_map_statistics(bundle_dir, base_meta, small_scan, capsys):
    meta = copy.deepcopy(base_meta)
    del meta["weights"]["map_statistics"]  # it used to load, pass `info` and fail in `score`
    _write(bundle_dir, meta)
    assert main(["info", "--model", str(bundle_dir)]) == EXIT_USAGE
    assert main(["score", "--model", str(bundle_dir), "--input", str(small_scan), "--output",
                 str(bundle_dir.parent / "out"), "--device", "cpu"]) == EXIT_USAGE  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("weights.map_statistics: missing") == 2


def test_the_demo_model_passes_the_schema():
    from AnomalyFlagLib.bundle import check_metadata
    from conftest import ROOT

    demo = ROOT / "Resources" / "Models" / "AnomalyFlagDemoChestCT"
    bundle = check_metadata(json.loads((demo / METADATA_FILE).read_text()), demo)
    assert bundle.preprocess.image_size == 192 and bundle.calibration.num_slices == 21


def test_training_refuses_a_configuration_that_loading_would_refuse():
    from AnomalyFlagLib.bundle import new_bundle
    from AnomalyFlagLib.config import PreprocessConfig, ScoreConfig
    from AnomalyFlagLib.detectors import backend_class

    arch, options = backend_class("restoration").tiny()
    with pytest.raises(ValueError, match="position_bins: expected an integer, found true"):
        new_bundle("restoration", arch, options, PreprocessConfig(image_size=64), ScoreConfig(position_bins=True), "m")
    options.learning_rate = float("inf")
    with pytest.raises(ValueError, match="learning_rate: expected a finite number"):
        new_bundle("restoration", arch, options, PreprocessConfig(image_size=64), ScoreConfig(), "m")


def test_a_bad_false_flag_rate_for_calibrate_is_a_clean_error(tiny_model, phantom_normal_dir, tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tiny_model), "--input", str(phantom_normal_dir), "--output",
               str(tmp_path / "re"), "--false-flag-rate", "0.7", "--device", "cpu"])  # fmt: skip
    assert rc == EXIT_USAGE and "target_false_flag_rate: expected a rate between 0 and 0.5" in capsys.readouterr().err
    assert not (tmp_path / "re").exists()


# Seeded fuzzing of metadata.json values.

POOL = ["x", "", "MR", "scan", True, False, None, [], {}, [0.0, 1.0], {"x": 1}, 0, 1, -1, 2, 0.5, 64, 1e308,
        -1e308, 1e-308, math.nan, math.inf, -math.inf, 10**20]  # fmt: skip


def _paths(value, prefix=()):
    """Every key path of a JSON value (not the root)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _mutate(meta, path, rng):
    """Apply one seeded mutation at `path`; returns its description."""
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    old = parent[key]
    ops = ["replace", "replace", "replace", "delete"]
    if isinstance(old, list):
        ops += ["append", "drop", "double"]
    elif isinstance(old, dict):
        ops += ["add_key"]
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
        ops += ["negate", "scale", "retype"]
    elif isinstance(old, str):
        ops += ["edit"]
    op = rng.choice(ops)
    if op == "delete":
        del parent[key]
        return f"{path}: delete"
    if op == "append":
        old.append(copy.deepcopy(old[-1]) if old else 0.0)
    elif op == "drop":
        if old:
            old.pop()
    elif op == "double":
        parent[key] = old + copy.deepcopy(old)
    elif op == "add_key":
        old["fuzz_extra"] = 1
    elif op == "negate":
        parent[key] = -old if old else -1
    elif op == "scale":
        parent[key] = old * rng.choice([1e6, 1e-6, 3])
    elif op == "retype":
        parent[key] = float(old) if isinstance(old, int) else int(old) if math.isfinite(old) else 0
    elif op == "edit":
        parent[key] = rng.choice(
            [old + "x", old.upper(), old[:-1], old + "/..", old[:-1] + chr(ord(old[-1:] or "a") ^ 1)]
        )
    else:
        parent[key] = copy.deepcopy(rng.choice(POOL))
    return f"{path}: {op} -> {_short(parent[key])}"


def _short(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mutations(base, seed=0, repeats=2, extra=60):
    """`repeats` mutations of every key path (the weights table and nested keys included), then `extra`
    mutants with two or three mutations each."""
    rng = random.Random(seed)
    for path in list(_paths(base)):
        for _ in range(repeats):
            meta = copy.deepcopy(base)
            yield meta, _mutate(meta, path, rng)
    for _ in range(extra):
        meta = copy.deepcopy(base)
        labels = []
        for _ in range(rng.choice([2, 3])):
            paths = list(_paths(meta))
            if paths:
                labels.append(_mutate(meta, rng.choice(paths), rng))
        yield meta, "; ".join(labels)


@pytest.mark.slow
def test_fuzzed_metadata_either_loads_and_scores_or_fails_with_one_bundle_error(
    tiny_model, base_meta, small_scan, tmp_path, capsys
):
    """A mutant that loads must pass `info` and score; one that does not must give one BundleError, and
    `info` and `score` must both exit with the usage error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny forward passes: thread hand-offs would dominate on busy cores
    try:
        _fuzz(tiny_model, base_meta, small_scan, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _fuzz(tiny_model, base_meta, small_scan, tmp_path, capsys):
    started = time.monotonic()
    bundle = tmp_path / "fuzzed"
    shutil.copytree(tiny_model, bundle)  # the tensor files once; each mutant rewrites only metadata.json
    score = ["score", "--model", str(bundle), "--input", str(small_scan), "--output", str(tmp_path / "out"),
             "--device", "cpu"]  # fmt: skip
    problems, loaded, refused = [], 0, 0
    for meta, label in _mutations(base_meta):
        _write(bundle, meta)
        try:
            try:
                load_bundle(bundle)
                ok = True
            except BundleError as exc:
                ok, message = False, str(exc)
                if str(bundle) not in message or "\n" in message:
                    problems.append(f"{label}: the message does not name the bundle on one line: {message}")
            rc_info = main(["info", "--model", str(bundle)])
            rc_score = main(score)
        except Exception:
            problems.append(f"{label}: raised\n{traceback.format_exc(limit=-3)}")
            continue
        loaded, refused = loaded + ok, refused + (not ok)
        err = capsys.readouterr().err
        expected = 0 if ok else EXIT_USAGE
        if (rc_info, rc_score) != (expected, expected) or (not ok and err.count(message) != 2):
            problems.append(
                f"{label}: load {'ok' if ok else 'refused'}, info {rc_info}, score {rc_score}: {err[-300:]}"
            )
    elapsed = time.monotonic() - started
    print(f"{loaded + refused} mutants: {loaded} loaded and scored, {refused} refused, {elapsed:.1f} s")
    assert not problems, "\n".join(problems[:20])
    assert loaded >= 20 and refused >= 200, (loaded, refused)
