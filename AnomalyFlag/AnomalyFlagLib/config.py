"""Backend-neutral configuration, stored verbatim in a bundle's metadata.json, and the typed-field checks
that every stored configuration goes through.

Each backend keeps its own architecture and training-option dataclasses (see `detectors`); the two
here describe what every backend shares: how a slice becomes a network input, and how pixel maps
become calibrated slice scores. A configuration dataclass declares its field types by annotation and
its ranges in `validate()`; `config_from_dict` and `check_config` apply both and raise `FieldError`
naming the offending field (e.g. `windows[1][0]`).
"""

import json
import math
import types
from dataclasses import asdict, dataclass, field, fields
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

METADATA_FILE = "metadata.json"
"""The file of a bundle folder that holds its metadata; a folder without it is not a model bundle."""
CT_WINDOWS = [[-160.0, 240.0], [-1000.0, 1000.0], [1000.0, 3000.0]]
"""Soft tissue (a 30 HU lesion moves this channel by 0.15), wide (air, fat, bone) and metal (above bone)."""
MR_WINDOWS = [[0.0, 1.0]]
"""The volume's 1st..99th percentile range."""
MODALITIES = ("CT", "MR")
MAX_WINDOWS = 8
MAX_INTENSITY = 1e6
"""Largest magnitude of a window bound or body threshold (HU, or MRI units where 1 is the 99th percentile)."""
FOV_RANGE_MM = (10.0, 2000.0)
MAX_POSITION_BINS = 32
MAX_NEIGHBOUR_SLICES = 50
MAX_MAP_SIGMA_MM = 20.0
_UNIONS = (Union, getattr(types, "UnionType", Union))  # typing.Optional[X] and, from Python 3.10, X | None


class FieldError(ValueError):
    """A value that does not fit its field: `key` is its path (`windows[1][0]`), `problem` what is wrong."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

    def under(self, prefix: str) -> "FieldError":
        """The same error with its path prefixed by the key it sits under."""
        return FieldError(join_key(prefix, self.key), self.problem)


def join_key(prefix: str, key) -> str:
    """`prefix.key`, or `prefix[key]` for a list index."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    if not prefix or not key:
        return prefix or key
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


def describe(value) -> str:
    """A JSON value as an error message shows it (short values verbatim)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= 60:
        return text
    if isinstance(value, str):
        return text[:50] + '..."'
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return "a number of more than 60 digits"


def expect(ok: bool, key: str, expected: str, found) -> None:
    """Raise FieldError('expected ..., found ...') at `key` unless `ok`."""
    if not ok:
        raise FieldError(key, f"expected {expected}, found {describe(found)}")


def _type_name(kind) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if kind in names:
        return names[kind]
    if kind is list or get_origin(kind) is list:
        return "a list"
    if kind is dict or get_origin(kind) is dict:
        return "an object"
    return str(kind)


def check_value(value, kind, key: str = ""):
    """`value` (parsed JSON) checked against the annotation `kind`: bool, int, float (finite; an int is
    taken), str, Optional[...], List[...] and Dict[str, ...]; other annotations are not checked. A bool
    is never a number. Returns the value, float fields as float. Raises FieldError."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in _UNIONS:
        others = [a for a in args if a is not type(None)]
        if value is None and len(others) < len(args):
            return None
        if len(others) != 1:
            return value  # a union of several types: not checked
        try:
            return check_value(value, others[0], key)
        except FieldError as exc:
            if exc.key != key or len(others) == len(args):
                raise
            raise FieldError(key, f"expected {_type_name(others[0])} or null, found {describe(value)}") from None
    if kind is bool:
        expect(isinstance(value, bool), key, "true or false", value)
    elif kind is int:
        expect(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
    elif kind is float:
        expect(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a finite number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        expect(math.isfinite(number), key, "a finite number", value)
        value = number
    elif kind is str:
        expect(isinstance(value, str), key, "a string", value)
    elif kind is list or origin is list:
        expect(isinstance(value, (list, tuple)), key, _type_name(kind), value)
        if args:
            value = [check_value(v, args[0], join_key(key, i)) for i, v in enumerate(value)]
    elif kind is dict or origin is dict:
        expect(isinstance(value, dict), key, "an object", value)
        if args:
            value = {k: check_value(v, args[1], join_key(key, str(k))) for k, v in value.items()}
    return value


def check_keys(data, key: str, required, what: str) -> None:
    """`data` is an object holding exactly the keys `required` (`what` names it in messages)."""
    expect(isinstance(data, dict), key, f"an object ({what})", data)
    unknown = sorted(set(data) - set(required))
    if unknown:
        raise FieldError(key, f"unknown {what} fields {unknown}; the bundle is from another version of AnomalyFlag")
    for name in required:
        if name not in data:
            raise FieldError(join_key(key, name), "missing (a saved bundle always records it)")


def _annotations(cls) -> dict:
    """Field types by name; string annotations resolved (left unchecked when they cannot be)."""
    hints = {f.name: f.type for f in fields(cls)}
    if any(isinstance(kind, str) for kind in hints.values()):
        try:
            hints.update(get_type_hints(cls))
        except Exception:
            hints = {name: Any if isinstance(kind, str) else kind for name, kind in hints.items()}
    return hints


def check_config(config, key: str = "") -> None:
    """Check a configuration dataclass: each field against its annotation, then its `validate()`."""
    hints = _annotations(type(config))
    for f in fields(config):
        check_value(getattr(config, f.name), hints.get(f.name, Any), join_key(key, f.name))
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except FieldError as exc:
            raise exc.under(key) from None
        except ValueError as exc:
            raise FieldError(key, str(exc)) from None


@dataclass
class PreprocessConfig:
    """How a slice becomes a network input: intensity windows, field of view, size and orientation.

    Slices are taken along the volume's axis closest to superior-inferior and turned so that rows run
    anterior->posterior and columns right->left (radiological display), resampled to pixels of
    fov_mm / image_size, and the image_size square centred on the body is cut out (fov_mm None uses the
    whole slice). CT intensities are HU; MRI intensities are mapped per volume so that the
    `mr_percentiles` percentiles become 0 and 1. Each window [low, high] becomes one input channel.
    """

    modality: str = "CT"
    windows: List[List[float]] = field(default_factory=lambda: [list(w) for w in CT_WINDOWS])
    image_size: int = 192
    fov_mm: Optional[float] = 384.0
    body_threshold: float = -500.0
    centre_on_body: bool = True
    mr_percentiles: List[float] = field(default_factory=lambda: [1.0, 99.0])

    @classmethod
    def for_modality(cls, modality: str, windows=None, **kwargs) -> "PreprocessConfig":
        """Defaults for CT or MR (windows and body threshold in that modality's units); `windows` None
        keeps the modality's default windows."""
        modality = modality.upper()
        if modality == "MR":
            windows = windows or [list(w) for w in MR_WINDOWS]
            kwargs.setdefault("body_threshold", 0.1)
        if windows:
            kwargs["windows"] = [list(w) for w in windows]
        return cls(modality=modality, **kwargs)

    def validate(self) -> None:
        """Raise FieldError for a value out of range (`check_config` checks the types first)."""
        expect(self.modality in MODALITIES, "modality", " or ".join(map(json.dumps, MODALITIES)), self.modality)
        expect(1 <= len(self.windows) <= MAX_WINDOWS, "windows", f"1 to {MAX_WINDOWS} windows", self.windows)
        for i, window in enumerate(self.windows):
            key = join_key("windows", i)
            expect(len(window) == 2, key, "a [low, high] pair", window)
            for j, bound in enumerate(window):
                expect(abs(bound) <= MAX_INTENSITY, join_key(key, j), f"a value within +-{MAX_INTENSITY:g}", bound)
            expect(window[0] < window[1], key, "a [low, high] pair with low < high", window)
        size = self.image_size
        expect(32 <= size <= 512 and size % 16 == 0, "image_size", "a multiple of 16 from 32 to 512", size)
        lo, hi = FOV_RANGE_MM
        fov_ok = self.fov_mm is None or lo <= self.fov_mm <= hi
        expect(fov_ok, "fov_mm", f"{lo:g} to {hi:g} mm, or null for the whole slice", self.fov_mm)
        body = self.body_threshold
        expect(abs(body) <= MAX_INTENSITY, "body_threshold", f"a value within +-{MAX_INTENSITY:g}", body)
        p = self.mr_percentiles
        expect(len(p) == 2 and 0 <= p[0] < p[1] <= 100, "mr_percentiles", "[low, high], 0 <= low < high <= 100", p)


@dataclass
class ScoreConfig:
    """How pixel maps become a heatmap and a calibrated slice score (the same for every backend).

    Each component map is normalised per pixel by held-out normal statistics in `position_bins` bins of
    slice position (robust scale floored at `pixel_floor` times the component's overall scale), the
    weighted normalised maps are summed and smoothed by `map_sigma_mm`; the slice score is the mean of
    the top `score_area_mm2` of that map inside the body. A slice then takes the highest score within
    `neighbour_slices` slices of it (anomalies are 3D), is normalised by normal median and MAD in
    `calibration_bins` bins of slice position and flagged above the quantile that flags
    `target_false_flag_rate` of normal slices. One calibration bin is the default: per-bin medians and
    MADs from a few held-out subjects overfit and amplified the scan ends of new subjects (see
    docs/detector-experiments.md, section 8). With `relative_to_scan`, a scan's level (the median of its
    normalised slice scores, when positive) is subtracted before the threshold, in calibration and in
    scoring alike (`calibration.scan_level`); bundles made before it load without it.
    """

    position_bins: int = 4
    calibration_bins: int = field(default=1, metadata={"absent_in_older_bundles": True})
    relative_to_scan: bool = field(default=True, metadata={"absent_in_older_bundles": True, "older_value": False})
    pixel_floor: float = 2.0
    neighbour_slices: int = 1
    map_sigma_mm: float = 2.0
    score_area_mm2: float = 400.0
    target_false_flag_rate: float = 0.05
    pixel_false_positive_rate: float = 0.005

    def validate(self) -> None:
        """Raise FieldError for a value out of range (`check_config` checks the types first)."""
        for name in ("position_bins", "calibration_bins"):
            bins = getattr(self, name)
            expect(1 <= bins <= MAX_POSITION_BINS, name, f"1 to {MAX_POSITION_BINS}", bins)
        expect(0 < self.pixel_floor <= 1000, "pixel_floor", "above 0, at most 1000", self.pixel_floor)
        expect(0 <= self.neighbour_slices <= MAX_NEIGHBOUR_SLICES, "neighbour_slices",
               f"0 to {MAX_NEIGHBOUR_SLICES}", self.neighbour_slices)  # fmt: skip
        sigma = self.map_sigma_mm
        expect(0 <= sigma <= MAX_MAP_SIGMA_MM, "map_sigma_mm", f"0 to {MAX_MAP_SIGMA_MM:g} mm", sigma)
        area = self.score_area_mm2
        expect(0 < area <= 1e6, "score_area_mm2", "an area above 0, at most 1e6 mm2", area)
        check_rate(self.target_false_flag_rate, "target_false_flag_rate")
        check_rate(self.pixel_false_positive_rate, "pixel_false_positive_rate")


def check_rate(value: float, key: str) -> None:
    """A target false-positive rate: between 0 and 0.5 (exclusive)."""
    expect(0 < value < 0.5, key, "a rate between 0 and 0.5", value)


def config_from_dict(cls, data, key: str = ""):
    """Build a configuration dataclass from metadata at `key`: every field present with its annotated
    type (except fields added since, which older bundles lack and which take their default, or their
    `older_value` where the field's metadata has one: what those bundles did), no unknown
    field (a newer or foreign bundle), then `validate()`. Raises FieldError."""
    present = data if isinstance(data, dict) else {}
    names = [
        f.name for f in fields(cls) if f.init and (f.name in present or not f.metadata.get("absent_in_older_bundles"))
    ]
    check_keys(data, key, names, cls.__name__)
    hints = _annotations(cls)
    values = {name: check_value(data[name], hints.get(name, Any), join_key(key, name)) for name in names}
    absent = [f for f in fields(cls) if f.name not in names and "older_value" in f.metadata]
    config = cls(**values, **{f.name: f.metadata["older_value"] for f in absent})
    check_config(config, key)
    return config


def config_to_dict(config) -> dict:
    return asdict(config)
