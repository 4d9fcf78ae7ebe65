"""Detector backends behind one contract (`base.DetectorBackend`) and the registry that names them.

Built-in backends are registered here; another package (or a test) adds one with `register_backend`
and it is at once trainable, scorable and loadable through the public commands.
"""

from typing import Dict, Type

from ..results import LEADING_COLUMNS, TRAILING_COLUMNS
from .base import (
    PATIENTS,
    UNLABELLED,
    DetectorBackend,
    ScoreComponent,
    TrainingData,
    TrainingInput,
    TrainingRun,
    TrainingStage,
    option,
)

DEFAULT_BACKEND = "restoration"
TRAINING_INPUTS = (UNLABELLED, PATIENTS)  # what a backend may train on besides the normal scans

BACKENDS: Dict[str, Type[DetectorBackend]] = {}


def register_backend(cls: Type[DetectorBackend]) -> Type[DetectorBackend]:
    """Add a backend class to the registry (usable as a decorator); its `name` must be new."""
    for attribute in ("name", "summary", "Architecture", "Options", "components"):
        if not hasattr(cls, attribute):
            raise TypeError(f"backend {cls.__name__} does not define '{attribute}'")
    clash = {c.name for c in cls.components} & set(LEADING_COLUMNS + TRAILING_COLUMNS)
    if clash:
        raise ValueError(f"backend {cls.name}: component names {sorted(clash)} are reserved slice-table columns")
    if all(c.whole_slice for c in cls.components):
        raise ValueError(f"backend {cls.name}: every score component is whole-slice; the anomaly map needs one map")
    if cls.name in BACKENDS and BACKENDS[cls.name] is not cls:
        raise ValueError(f"a detector backend named '{cls.name}' is already registered")
    BACKENDS[cls.name] = cls
    return cls


def backend_class(name: str) -> Type[DetectorBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown detector backend '{name}'; known: {', '.join(sorted(BACKENDS))}") from None


def _register_builtins() -> None:
    from .ascnet import ASCNetBackend
    from .descargan import DeScarGANBackend
    from .fanogan import FAnoGANBackend
    from .ganomaly import GANomalyBackend
    from .hybrid import HybridBackend
    from .normative import NormativeBackend
    from .progressive_ganomaly import ProgressiveGANomalyBackend
    from .restoration import RestorationBackend
    from .stylegan2 import StyleGAN2Backend

    builtins = (RestorationBackend, FAnoGANBackend, NormativeBackend, StyleGAN2Backend, GANomalyBackend,
                ProgressiveGANomalyBackend, ASCNetBackend, DeScarGANBackend, HybridBackend)  # fmt: skip
    for cls in builtins:
        register_backend(cls)


_register_builtins()

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DetectorBackend",
    "TRAINING_INPUTS",
    "TrainingInput",
    "ScoreComponent",
    "TrainingData",
    "TrainingRun",
    "TrainingStage",
    "backend_class",
    "option",
    "register_backend",
]
