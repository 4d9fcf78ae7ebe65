"""Shared fixtures: phantom data on disk and a tiny calibrated model trained on it (CPU, seconds)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))

TINY_SLICES = 24
TINY_SIZE = 64


def tiny_configs(backend=None):
    """(backend, architecture, options, preprocess) of a model that trains in seconds (default backend)."""
    from AnomalyFlagLib.config import PreprocessConfig
    from AnomalyFlagLib.detectors import DEFAULT_BACKEND, backend_class

    backend = backend or DEFAULT_BACKEND
    architecture, options = backend_class(backend).tiny()
    return backend, architecture, options, PreprocessConfig(image_size=TINY_SIZE, fov_mm=None)


@pytest.fixture(scope="session")
def phantom_normal_dir(tmp_path_factory) -> Path:
    """Three normal phantom cases (24 slices of 64x64) with their (empty) anomaly masks."""
    from AnomalyFlagLib.phantom import make_phantom_set

    folder = tmp_path_factory.mktemp("normal")
    make_phantom_set(folder, num_cases=3, anomalous=False, seed=0, num_slices=TINY_SLICES, size=TINY_SIZE)
    return folder


@pytest.fixture(scope="session")
def phantom_anomalous_dir(tmp_path_factory) -> Path:
    """Two phantom cases with inserted anomalies and their exact masks."""
    from AnomalyFlagLib.phantom import make_phantom_set

    folder = tmp_path_factory.mktemp("anomalous")
    make_phantom_set(folder, num_cases=2, anomalous=True, seed=1, num_slices=TINY_SLICES, size=TINY_SIZE)
    return folder


@pytest.fixture(scope="session")
def tiny_model(phantom_normal_dir, tmp_path_factory) -> Path:
    """A calibrated bundle (image size 64) trained for a few iterations on the normal phantoms."""
    from AnomalyFlagLib.training import train

    backend, architecture, options, preprocess = tiny_configs()
    out = tmp_path_factory.mktemp("models") / "tiny"
    return train(phantom_normal_dir, out, backend, architecture, options, preprocess, device="cpu", log=lambda s: None)


@pytest.fixture(scope="session")
def flagging_model(tiny_model, phantom_normal_dir, tmp_path_factory) -> Path:
    """The tiny model recalibrated to flag 40% of normal slices: review tests need flags, not accuracy."""
    from AnomalyFlagLib.training import recalibrate

    out = tmp_path_factory.mktemp("models") / "flagging"
    return recalibrate(tiny_model, phantom_normal_dir, out, target_rate=0.4, device="cpu", log=lambda s: None)
