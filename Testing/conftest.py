"""Shared fixtures: phantom data on disk and a tiny calibrated model trained on it (CPU, seconds)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))

TINY_SLICES = 24
TINY_SIZE = 64


def tiny_configs():
    from AnomalyFlagLib.config import ModelConfig, PreprocessConfig
    from AnomalyFlagLib.detector import TrainingOptions

    model = ModelConfig(image_size=64, latent_dim=32, base_width=8, max_width=32)
    preprocess = PreprocessConfig(window_min=-300.0, window_max=400.0, fov_mm=None)
    options = TrainingOptions(batch_size=16, gan_iterations=20, encoder_iterations=20, critic_steps=2)
    return model, preprocess, options


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

    model, preprocess, options = tiny_configs()
    out = tmp_path_factory.mktemp("models") / "tiny"
    return train(phantom_normal_dir, out, model, preprocess, options=options, device="cpu", log=lambda s: None)
