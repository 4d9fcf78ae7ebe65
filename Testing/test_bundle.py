"""Model bundles: round trip, checksums, and one clear error for every kind of bad bundle."""

import json
import shutil

import pytest
import torch
from AnomalyFlagLib.bundle import FORMAT_VERSION, METADATA_FILE, load_bundle, save_bundle
from AnomalyFlagLib.errors import BundleError


@pytest.fixture()
def bundle_copy(tiny_model, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_model, dst)
    return dst


def _meta(path):
    return json.loads((path / METADATA_FILE).read_text())


def _write_meta(path, meta):
    (path / METADATA_FILE).write_text(json.dumps(meta))


def test_metadata_records_what_a_user_needs(tiny_model):
    meta = _meta(tiny_model)
    assert meta["format_version"] == FORMAT_VERSION
    backend = meta["backend"]
    assert set(meta[backend]) == {"architecture", "training_options"}
    assert meta["preprocessing"]["image_size"] == 64
    assert len(meta["preprocessing"]["windows"]) == 3 and meta["preprocessing"]["modality"] == "CT"
    assert meta["orientation"]
    assert [c["name"] for c in meta["components"]] == ["reconstruction", "feature", "discriminative"]
    assert meta["threshold"] == meta["calibration"]["threshold"]
    assert meta["training"]["cases"] == 3 and meta["training"]["calibration_slices"] >= 20
    assert {"anomalyflag", "torch", "monai", "simpleitk"} <= set(meta["versions"])
    for name in ("generator", "encoder", "critic", "segmenter", "map_statistics"):
        assert len(meta["weights"][name]["sha256"]) == 64
        assert (tiny_model / meta["weights"][name]["file"]).is_file()


def test_round_trip_keeps_weights_and_calibration(tiny_model, tmp_path):
    bundle = load_bundle(tiny_model)
    out = save_bundle(bundle, tmp_path / "again")
    again = load_bundle(out)
    nets = {**bundle.backend.networks(), "statistics": bundle.statistics}
    for name, net in nets.items():
        other = {**again.backend.networks(), "statistics": again.statistics}[name].state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key} changed"
    assert again.calibration == bundle.calibration


def test_tampered_weights_are_refused(bundle_copy):
    f = bundle_copy / "encoder.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoder\.safetensors.*SHA-256"):
        load_bundle(bundle_copy)


def test_missing_weights_file(bundle_copy):
    (bundle_copy / "critic.safetensors").unlink()
    with pytest.raises(BundleError, match=r"critic\.safetensors.*missing"):
        load_bundle(bundle_copy)


def test_pickle_in_place_of_weights_is_not_executed(bundle_copy, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    target = bundle_copy / "generator.safetensors"
    torch.save({"x": Payload()}, target)
    meta = _meta(bundle_copy)
    from AnomalyFlagLib.atomic_files import sha256_of

    meta["weights"]["generator"]["sha256"] = sha256_of(target)  # a consistent but hostile bundle
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(bundle_copy)
    assert not marker.exists()


def test_newer_format_version(bundle_copy):
    meta = _meta(bundle_copy)
    meta["format_version"] = FORMAT_VERSION + 1
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="format version .* Update AnomalyFlag"):
        load_bundle(bundle_copy)


def test_damaged_metadata(bundle_copy):
    (bundle_copy / METADATA_FILE).write_text('{"format": "anomalyflag-model-bundle", ')
    with pytest.raises(BundleError, match="damaged"):
        load_bundle(bundle_copy)


def test_foreign_folder(tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "some-other-tool", "version": 3}))
    with pytest.raises(BundleError, match="not an AnomalyFlag model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_older_format_asks_for_retraining(bundle_copy):
    meta = _meta(bundle_copy)
    meta["format_version"] = 1
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="older version of AnomalyFlag .* Retrain it"):
        load_bundle(bundle_copy)


def test_weights_of_another_architecture(bundle_copy):
    meta = _meta(bundle_copy)
    meta[meta["backend"]]["architecture"]["base_width"] = 12
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="does not fit the .* architecture"):
        load_bundle(bundle_copy)


def test_weights_path_outside_bundle(bundle_copy):
    meta = _meta(bundle_copy)
    meta["weights"]["critic"]["file"] = "../critic.safetensors"
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_copy)


def test_unknown_configuration_field(bundle_copy):
    meta = _meta(bundle_copy)
    meta["preprocessing"]["dual_energy"] = True
    _write_meta(bundle_copy, meta)
    with pytest.raises(BundleError, match="unknown PreprocessConfig fields"):
        load_bundle(bundle_copy)
