"""Model bundles: a folder with metadata.json and one safetensors file per network.

metadata.json records the format version, architecture, preprocessing, scoring settings, calibration,
training summary and library versions, and the SHA-256 of every weights file. Loading checks all of
it before touching the weights and never unpickles anything.
"""

import datetime
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .calibration import Calibration
from .config import ModelConfig, PreprocessConfig, ScoreConfig, config_from_dict, config_to_dict
from .detector import BACKENDS, AnomalyDetector, create_detector
from .errors import BundleError

FORMAT_NAME = "anomalyflag-model-bundle"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict:
    import monai
    import numpy
    import SimpleITK

    return {
        "anomalyflag": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "simpleitk": SimpleITK.Version_VersionString(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Bundle:
    """A loaded model: detector with weights, configuration and calibration."""

    path: Optional[Path]
    detector: AnomalyDetector
    model_config: ModelConfig
    preprocess: PreprocessConfig
    scoring: ScoreConfig
    calibration: Optional[Calibration]
    metadata: dict

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.name if self.path else "unsaved model")

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise BundleError(f"model '{self.name}' is not calibrated; run 'anomalyflag calibrate' first.")
        return self.calibration.threshold

    def fingerprint(self) -> str:
        """Short identity of the weights and calibration (for sidecars and summaries)."""
        weights = self.metadata.get("weights", {})
        text = json.dumps([weights, self.calibration.to_dict() if self.calibration else None], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to(self, device) -> "Bundle":
        for net in self.detector.networks().values():
            net.to(device)
        return self


def new_bundle(backend: str, model_config: ModelConfig, preprocess: PreprocessConfig, scoring: ScoreConfig, name: str):
    detector = create_detector(backend, model_config, scoring)
    metadata = {"name": name, "backend": backend}
    return Bundle(None, detector, model_config, preprocess, scoring, None, metadata)


def save_bundle(bundle: Bundle, path, training_summary: Optional[dict] = None) -> Path:
    """Write the bundle folder atomically (a temporary folder renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {}
        for name, net in bundle.detector.networks().items():
            file = f"{name}.safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(tmp / file), metadata={"network": name, "format_version": str(FORMAT_VERSION)})
            weights[name] = {"file": file, "sha256": sha256_of(tmp / file)}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": bundle.metadata.get("name", path.name),
            "backend": bundle.detector.backend,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "architecture": config_to_dict(bundle.model_config),
            "preprocessing": config_to_dict(bundle.preprocess),
            "orientation": "axial slices along the voxel axis closest to S; rows A->P, columns R->L",
            "position_reference": "scan",
            "scoring": config_to_dict(bundle.scoring),
            "kappa": bundle.scoring.kappa,
            "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
            "threshold": bundle.calibration.threshold if bundle.calibration else None,
            "training": training_summary if training_summary is not None else bundle.metadata.get("training"),
            "versions": library_versions(),
            "weights": weights,
        }
        with open(tmp / METADATA_FILE, "w") as f:
            json.dump(metadata, f, indent=2)
            f.write("\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    bundle.path = path
    bundle.metadata = metadata
    return path


def _read_metadata(path: Path) -> dict:
    if not path.exists():
        raise BundleError(f"model bundle '{path}' does not exist.")
    if not path.is_dir():
        raise BundleError(f"model bundle '{path}' is not a folder; a bundle is a folder holding {METADATA_FILE}.")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"model bundle '{path}' has no {METADATA_FILE}; it is not an AnomalyFlag model.")
    try:
        metadata = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{meta_path}' is damaged (not valid JSON: {exc}).") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise BundleError(f"'{meta_path}' is not an AnomalyFlag model bundle (format is not '{FORMAT_NAME}').")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"'{meta_path}' has bundle format version {version}; this AnomalyFlag ({__version__}) reads up to "
            f"version {FORMAT_VERSION}. Update AnomalyFlag to use this model."
        )
    if metadata.get("backend") not in BACKENDS:
        raise BundleError(f"'{meta_path}' names detector backend '{metadata.get('backend')}', which is not installed.")
    return metadata


def load_bundle(path, device="cpu") -> Bundle:
    """Load and verify a bundle; any problem raises one BundleError naming the file."""
    path = Path(path)
    metadata = _read_metadata(path)
    meta_path = path / METADATA_FILE
    try:
        model_config = config_from_dict(ModelConfig, metadata["architecture"], str(meta_path))
        model_config.validate()
        preprocess = config_from_dict(PreprocessConfig, metadata["preprocessing"], str(meta_path))
        scoring = config_from_dict(ScoreConfig, metadata["scoring"], str(meta_path))
        calibration = Calibration.from_dict(metadata["calibration"]) if metadata.get("calibration") else None
        weights = metadata["weights"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"'{meta_path}' is incomplete or inconsistent: {exc}") from None
    detector = create_detector(metadata["backend"], model_config, scoring)
    for name, net in detector.networks().items():
        entry = weights.get(name)
        if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
            raise BundleError(f"'{meta_path}' lists no weights file with a checksum for the {name}.")
        file = path / entry["file"]
        if file.resolve().parent != path.resolve():
            raise BundleError(f"'{meta_path}' points the {name} weights outside the bundle folder ({entry['file']}).")
        if not file.is_file():
            raise BundleError(f"weights file '{file}' is missing from the bundle.")
        if sha256_of(file) != entry["sha256"]:
            raise BundleError(
                f"weights file '{file}' does not match the SHA-256 in {METADATA_FILE}: it is damaged or was modified."
            )
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"weights file '{file}' is not a valid safetensors file: {exc}") from None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BundleError(
                f"weights file '{file}' does not fit the {name} architecture in metadata: {first}"
            ) from None
        net.to(device).eval()
    return Bundle(path, detector, model_config, preprocess, scoring, calibration, metadata)
