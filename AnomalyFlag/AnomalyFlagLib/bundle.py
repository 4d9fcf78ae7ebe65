"""Model bundles: a folder with metadata.json and one safetensors file per network.

metadata.json records the format version, the backend with its own architecture and training options,
the preprocessing, the scoring settings, the calibration, the training summary and the library
versions, and the SHA-256 of every tensor file (the networks and the normal map statistics). Loading
checks every value of it against one schema (`check_metadata`: the configuration dataclasses' typed
fields and `validate()` ranges, plus the keys below) before touching the weights, and never unpickles
anything.
"""

import datetime
import hashlib
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic_files import atomic_path, dumps_json, sha256_of
from .calibration import Calibration, OrganCalibration
from .config import (
    METADATA_FILE,
    FieldError,
    PreprocessConfig,
    ScoreConfig,
    check_config,
    check_keys,
    check_value,
    config_from_dict,
    config_to_dict,
    describe,
    expect,
    join_key,
)
from .detectors import BACKENDS, DetectorBackend, backend_class
from .errors import BundleError
from .maps import BatchScores, MapScorer, MapStatistics
from .preprocessing import InputSpec

FORMAT_NAME = "anomalyflag-model-bundle"
FORMAT_VERSION = 2
STATISTICS = "map_statistics"
ORIENTATION = "axial slices along the voxel axis closest to S; rows A->P, columns R->L"
POSITION_REFERENCE = "scan"
SHA256 = re.compile(r"[0-9a-f]{64}")
TOP_LEVEL_KEYS = ("format", "format_version", "name", "backend", "components", "created", "preprocessing",
                  "orientation", "position_reference", "scoring", "calibration", "threshold", "training",
                  "versions", "weights")  # fmt: skip
"""The keys `save_bundle` writes besides the backend's own block (named after the backend)."""
OPTIONAL_KEYS = ("organ_calibration",)
"""Keys added within format version 2 that older bundles lack."""


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
    organ_calibration: Optional[OrganCalibration] = None

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
        parts = [weights, self.calibration.to_dict() if self.calibration else None]
        if self.organ_calibration is not None:
            parts.append(self.organ_calibration.to_dict())
        text = json.dumps(parts, sort_keys=True)
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
    """An untrained bundle; raises ValueError (FieldError naming the field) when the configuration is
    inconsistent: the same checks as loading."""
    cls = backend_class(backend)
    check_config(architecture)
    check_config(options)
    check_config(preprocess)
    check_config(scoring)
    spec = InputSpec.from_config(preprocess)
    cls.validate(architecture, spec)
    return Bundle(None, cls(architecture, spec), options, preprocess, scoring, metadata={"name": name})


def _tensor_files(bundle: Bundle) -> Dict[str, torch.nn.Module]:
    files = dict(bundle.backend.networks())
    if bundle.statistics is not None:
        files[STATISTICS] = bundle.statistics
    return files


def save_bundle(bundle: Bundle, path, training_summary: Optional[dict] = None) -> Path:
    """Write the bundle folder atomically (a temporary folder, every file fsynced, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = bundle.backend
    with atomic_path(path) as tmp:
        tmp.mkdir()
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
            "orientation": ORIENTATION,
            "position_reference": POSITION_REFERENCE,
            "scoring": config_to_dict(bundle.scoring),
            "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
            "threshold": bundle.calibration.threshold if bundle.calibration else None,
            "organ_calibration": bundle.organ_calibration.to_dict() if bundle.organ_calibration else None,
            "training": training_summary if training_summary is not None else bundle.metadata.get("training"),
            "versions": library_versions(),
            "weights": weights,
        }
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as f:
            f.write(dumps_json(metadata, indent=2) + "\n")
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
        text = meta_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(f"'{meta_path}' cannot be read: {exc.strerror or exc}.") from None
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise BundleError(f"'{meta_path}' is damaged (not valid JSON: {exc}).") from None


def _check_identity(metadata, path: Path) -> type:
    """Format, version and backend, with the messages that tell a foreign, newer or older bundle apart."""
    meta_path = path / METADATA_FILE
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise BundleError(f"'{meta_path}' is not an AnomalyFlag model bundle (format is not '{FORMAT_NAME}').")
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(
            f"'{meta_path}' is not a valid model bundle: format_version: expected {FORMAT_VERSION}, "
            f"found {describe(version)}."
        )
    if version > FORMAT_VERSION:
        raise BundleError(
            f"'{meta_path}' has bundle format version {describe(version)}: it was made by a newer AnomalyFlag; "
            f"this AnomalyFlag ({__version__}) reads up to version {FORMAT_VERSION}. Update AnomalyFlag to use "
            "this model."
        )
    if version < FORMAT_VERSION:
        raise BundleError(
            f"model bundle '{path}' was made by an older version of AnomalyFlag (bundle format {version}, "
            f"detector {describe(metadata.get('backend'))}); this version reads format {FORMAT_VERSION}. Retrain "
            "it with 'anomalyflag train' (its metadata.json lists the data and options it was trained with)."
        )
    backend, installed = metadata.get("backend"), ", ".join(sorted(BACKENDS))
    if not isinstance(backend, str):
        raise BundleError(
            f"'{meta_path}' is not a valid model bundle: backend: expected the name of a detector backend "
            f"({installed}), found {describe(backend)}."
        )
    if backend not in BACKENDS:
        raise BundleError(f"'{meta_path}' names detector backend '{backend}', which is not installed ({installed}).")
    return BACKENDS[backend]


def _check_components(components, cls) -> None:
    """The score components: the backend's own, in its order and with its weights."""
    declared = cls.components
    fits = isinstance(components, list) and len(components) == len(declared)
    expect(fits, "components", f"the {len(declared)} score components of backend '{cls.name}'", components)
    for i, (entry, component) in enumerate(zip(components, declared)):
        key = join_key("components", i)
        check_keys(entry, key, ("name", "description", "weight"), "score component")
        name = check_value(entry["name"], str, join_key(key, "name"))
        expect(name == component.name, join_key(key, "name"), describe(component.name), name)
        check_value(entry["description"], str, join_key(key, "description"))
        weight = check_value(entry["weight"], float, join_key(key, "weight"))
        expect(weight == component.weight, join_key(key, "weight"), f"{component.weight:g}", weight)


def _check_weights(weights, names) -> None:
    """The weights table: a file name and SHA-256 for exactly the tensor files `names`."""
    expect(isinstance(weights, dict), "weights", "an object with a file and SHA-256 per tensor file", weights)
    for name in weights:
        if name not in names:
            why = "the bundle has no calibration" if name == STATISTICS else f"expected only {names}"
            raise FieldError(join_key("weights", name), f"not a tensor file of this bundle ({why})")
    files = {}
    for name in names:
        key = join_key("weights", name)
        if name not in weights:
            why = "a calibrated bundle has normal map statistics" if name == STATISTICS else "one file per network"
            raise FieldError(key, f"missing ({why})")
        check_keys(weights[name], key, ("file", "sha256"), "weights entry")
        file_key, file = join_key(key, "file"), check_value(weights[name]["file"], str, join_key(key, "file"))
        if "/" in file or "\\" in file or file == "..":
            raise FieldError(file_key, f"expected a file name, found {describe(file)}: a path outside the bundle")
        expect(file not in ("", ".", METADATA_FILE), file_key, "the name of a safetensors file", file)
        expect(file not in files, file_key, f"a file of its own, not that of weights.{files.get(file)}", file)
        files[file] = name
        sha_key = join_key(key, "sha256")
        digest = check_value(weights[name]["sha256"], str, sha_key)
        expect(SHA256.fullmatch(digest) is not None, sha_key, "a SHA-256: 64 lowercase hexadecimal digits", digest)


def check_metadata(metadata, path) -> Bundle:
    """Check every value of a parsed metadata.json against the bundle schema; the bundle it describes,
    its networks built but no tensor file read. Any problem raises one BundleError naming the bundle,
    the key path (e.g. `preprocessing.windows[1][0]`) and what was expected and found."""
    path = Path(path)
    cls = _check_identity(metadata, path)
    try:
        return _check_fields(metadata, cls, path)
    except FieldError as exc:
        raise BundleError(f"'{path / METADATA_FILE}' is not a valid model bundle: {exc}.") from None


def _check_fields(metadata: dict, cls, path: Path) -> Bundle:
    name = cls.name
    optional = tuple(key for key in OPTIONAL_KEYS if key in metadata)
    check_keys(metadata, "", TOP_LEVEL_KEYS + optional + (name,), "bundle metadata")
    check_value(metadata["name"], str, "name")
    check_keys(metadata[name], name, ("architecture", "training_options"), f"'{name}' backend")
    architecture = config_from_dict(cls.Architecture, metadata[name]["architecture"], f"{name}.architecture")
    options = config_from_dict(cls.Options, metadata[name]["training_options"], f"{name}.training_options")
    _check_components(metadata["components"], cls)
    created = check_value(metadata["created"], str, "created")
    try:
        datetime.datetime.fromisoformat(created)
    except ValueError:
        expect(False, "created", "an ISO 8601 date and time", created)
    preprocess = config_from_dict(PreprocessConfig, metadata["preprocessing"], "preprocessing")
    spec = InputSpec.from_config(preprocess)
    try:
        cls.validate(architecture, spec)
    except FieldError as exc:
        raise exc.under(f"{name}.architecture") from None
    except ValueError as exc:
        raise FieldError(f"{name}.architecture", str(exc)) from None
    expect(metadata["orientation"] == ORIENTATION, "orientation", describe(ORIENTATION), metadata["orientation"])
    reference = metadata["position_reference"]
    expect(reference == POSITION_REFERENCE, "position_reference", describe(POSITION_REFERENCE), reference)
    scoring = config_from_dict(ScoreConfig, metadata["scoring"], "scoring")
    calibration, weights = None, metadata["weights"]
    if metadata["calibration"] is not None:
        calibration = Calibration.from_dict(metadata["calibration"], "calibration")
    elif metadata["threshold"] is not None or (isinstance(weights, dict) and STATISTICS in weights):
        expect(False, "calibration", "an object, as the bundle has a threshold and normal map statistics", None)
    threshold = check_value(metadata["threshold"], Optional[float], "threshold")
    if calibration is None:
        expect(threshold is None, "threshold", "null, as the bundle has no calibration", threshold)
    else:
        expected = f"calibration.threshold ({calibration.threshold!r})"
        expect(threshold == calibration.threshold, "threshold", expected, threshold)
    organ = None
    if metadata.get("organ_calibration") is not None:
        expect(calibration is not None, "organ_calibration", "null, as the bundle has no calibration", "an object")
        organ = OrganCalibration.from_dict(metadata["organ_calibration"], "organ_calibration")
    check_value(metadata["training"], Optional[dict], "training")
    check_value(metadata["versions"], Dict[str, str], "versions")
    backend = cls(architecture, spec)
    names = list(backend.networks()) + ([STATISTICS] if calibration is not None else [])
    _check_weights(weights, names)
    statistics = None
    if calibration is not None:
        statistics = MapStatistics.for_components(cls.components, scoring.position_bins, preprocess.image_size)
    return Bundle(path, backend, options, preprocess, scoring, statistics, calibration, metadata, organ)


def _load_tensors(path: Path, entry: dict, name: str, module: torch.nn.Module, device) -> None:
    file = path / entry["file"]
    if file.resolve().parent != path.resolve():
        raise BundleError(f"'{path / METADATA_FILE}' points the {name} weights outside the bundle folder ({file}).")
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
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = " ".join(lines[:2])
        first = first if len(first) <= 240 else first[:237] + "..."
        raise BundleError(f"weights file '{file}' does not fit the {name} architecture in metadata: {first}") from None
    module.to(device).eval()


def load_bundle(path, device="cpu") -> Bundle:
    """Load and verify a bundle: metadata.json against the schema (`check_metadata`), then each tensor
    file's SHA-256 and shapes; any problem raises one BundleError naming the file."""
    path = Path(path)
    bundle = check_metadata(_read_metadata(path), path)
    weights = bundle.metadata["weights"]
    for name, net in _tensor_files(bundle).items():
        _load_tensors(path, weights[name], name, net, device)
    return bundle
