"""Model bundles: a folder with metadata.json and one safetensors file per network.

metadata.json records the format version, the backend with its own architecture and training options,
the preprocessing, the scoring settings, the calibration, the training summary and the library
versions, and the SHA-256 of every tensor file (the networks and the normal map statistics). Loading
checks all of it before touching the weights and never unpickles anything.
"""

import datetime
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .calibration import Calibration
from .config import PreprocessConfig, ScoreConfig, config_from_dict, config_to_dict
from .detectors import BACKENDS, DetectorBackend, backend_class
from .errors import BundleError
from .maps import BatchScores, MapScorer, MapStatistics
from .preprocessing import InputSpec

FORMAT_NAME = "anomalyflag-model-bundle"
FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"
STATISTICS = "map_statistics"


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
    """A loaded model: backend with weights, configuration, normal map statistics and calibration."""

    path: Optional[Path]
    backend: DetectorBackend
    options: object
    preprocess: PreprocessConfig
    scoring: ScoreConfig
    statistics: Optional[MapStatistics] = None
    calibration: Optional[Calibration] = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.name if self.path else "unsaved model")

    @property
    def threshold(self) -> float:
        if self.calibration is None or self.statistics is None:
            raise BundleError(f"model '{self.name}' is not calibrated; run 'anomalyflag calibrate' first.")
        return self.calibration.threshold

    @property
    def components(self):
        return self.backend.components

    def fingerprint(self) -> str:
        """Short identity of the weights and calibration (for sidecars and summaries)."""
        weights = self.metadata.get("weights", {})
        text = json.dumps([weights, self.calibration.to_dict() if self.calibration else None], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def map_scorer(self) -> MapScorer:
        weights = {c.name: c.weight for c in self.components}
        spec = InputSpec.from_config(self.preprocess)
        return MapScorer(weights, self.statistics, self.scoring, spec.pixel_mm)

    def score_batch(self, x: torch.Tensor, pos: torch.Tensor, body: torch.Tensor) -> BatchScores:
        """Slice scores, component values and the anomaly map of preprocessed slices (see maps.MapScorer)."""
        if self.statistics is None:
            raise BundleError(f"model '{self.name}' has no normal map statistics; run 'anomalyflag calibrate'.")
        return self.map_scorer()(self.backend.maps(x, pos, body), pos, body)

    def to(self, device) -> "Bundle":
        self.backend.to(device)
        if self.statistics is not None:
            self.statistics.to(device)
        return self


def new_bundle(backend: str, architecture, options, preprocess: PreprocessConfig, scoring: ScoreConfig, name: str):
    """An untrained bundle; raises ValueError when the configuration is inconsistent."""
    cls = backend_class(backend)
    preprocess.validate()
    scoring.validate()
    spec = InputSpec.from_config(preprocess)
    cls.validate(architecture, spec)
    return Bundle(None, cls(architecture, spec), options, preprocess, scoring, metadata={"name": name})


def _tensor_files(bundle: Bundle) -> Dict[str, torch.nn.Module]:
    files = dict(bundle.backend.networks())
    if bundle.statistics is not None:
        files[STATISTICS] = bundle.statistics
    return files


def save_bundle(bundle: Bundle, path, training_summary: Optional[dict] = None) -> Path:
    """Write the bundle folder atomically (a temporary folder renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    backend = bundle.backend
    try:
        weights = {}
        for name, net in _tensor_files(bundle).items():
            file = f"{name}.safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(tmp / file), metadata={"network": name, "format_version": str(FORMAT_VERSION)})
            weights[name] = {"file": file, "sha256": sha256_of(tmp / file)}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": bundle.metadata.get("name", path.name),
            "backend": backend.name,
            backend.name: {
                "architecture": config_to_dict(backend.architecture),
                "training_options": config_to_dict(bundle.options),
            },
            "components": [
                {"name": c.name, "description": c.description, "weight": c.weight} for c in backend.components
            ],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "preprocessing": config_to_dict(bundle.preprocess),
            "orientation": "axial slices along the voxel axis closest to S; rows A->P, columns R->L",
            "position_reference": "scan",
            "scoring": config_to_dict(bundle.scoring),
            "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
            "threshold": bundle.calibration.threshold if bundle.calibration else None,
            "training": training_summary if training_summary is not None else bundle.metadata.get("training"),
            "versions": library_versions(),
            "weights": weights,
        }
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as f:
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
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
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
    if version < FORMAT_VERSION:
        raise BundleError(
            f"model bundle '{path}' was made by an older version of AnomalyFlag (bundle format {version}, "
            f"detector '{metadata.get('backend')}'); this version reads format {FORMAT_VERSION}. Retrain it with "
            "'anomalyflag train' (its metadata.json lists the data and options it was trained with)."
        )
    if metadata.get("backend") not in BACKENDS:
        raise BundleError(f"'{meta_path}' names detector backend '{metadata.get('backend')}', which is not installed.")
    return metadata


def _load_tensors(path: Path, meta_path: Path, weights: dict, name: str, module: torch.nn.Module, device) -> None:
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
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BundleError(f"weights file '{file}' does not fit the {name} architecture in metadata: {first}") from None
    module.to(device).eval()


def load_bundle(path, device="cpu") -> Bundle:
    """Load and verify a bundle; any problem raises one BundleError naming the file."""
    path = Path(path)
    metadata = _read_metadata(path)
    meta_path = path / METADATA_FILE
    name = metadata["backend"]
    cls = backend_class(name)
    try:
        block = metadata[name]
        architecture = config_from_dict(cls.Architecture, block["architecture"], str(meta_path))
        options = config_from_dict(cls.Options, block["training_options"], str(meta_path))
        preprocess = config_from_dict(PreprocessConfig, metadata["preprocessing"], str(meta_path))
        scoring = config_from_dict(ScoreConfig, metadata["scoring"], str(meta_path))
        preprocess.validate()
        scoring.validate()
        spec = InputSpec.from_config(preprocess)
        cls.validate(architecture, spec)
        calibration = Calibration.from_dict(metadata["calibration"]) if metadata.get("calibration") else None
        weights = metadata["weights"]
        if not isinstance(weights, dict):
            raise TypeError("'weights' is not an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"'{meta_path}' is incomplete or inconsistent: {exc}") from None
    backend = cls(architecture, spec)
    for net_name, net in backend.networks().items():
        _load_tensors(path, meta_path, weights, net_name, net, device)
    statistics = None
    if STATISTICS in weights:
        statistics = MapStatistics([c.name for c in cls.components], scoring.position_bins, preprocess.image_size)
        _load_tensors(path, meta_path, weights, STATISTICS, statistics, device)
    return Bundle(path, backend, options, preprocess, scoring, statistics, calibration, metadata)
