"""scripts/quality_benchmark.py --resume keeps a trained bundle only when it was trained as this run asks."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import quality_benchmark as qb  # noqa: E402
from AnomalyFlagLib.config import config_to_dict  # noqa: E402
from AnomalyFlagLib.detectors import backend_class  # noqa: E402


def _kept(backend: str, architecture, options) -> dict:
    return {"backend": backend, backend: {"architecture": config_to_dict(architecture),
                                          "training_options": config_to_dict(options)}}  # fmt: skip


def test_resume_refuses_a_bundle_trained_otherwise(tmp_path):
    cls = backend_class("restoration")
    architecture, options = cls.Architecture(), cls.Options()
    kept = _kept("restoration", architecture, options)
    qb._check_kept(kept, tmp_path, "restoration", architecture, options, set())
    longer = cls.Options(iterations=options.iterations * 2)
    with pytest.raises(SystemExit, match="iterations: kept"):
        qb._check_kept(kept, tmp_path, "restoration", architecture, longer, set())
    qb._check_kept(kept, tmp_path, "restoration", architecture, longer, {"iterations"})  # a time budget decides
    wider = cls.Architecture(base_width=architecture.base_width * 2)
    with pytest.raises(SystemExit, match="base_width"):
        qb._check_kept(kept, tmp_path, "restoration", wider, options, set())
    with pytest.raises(SystemExit, match="holds a 'restoration' model, not 'normative'"):
        qb._check_kept(kept, tmp_path, "normative", architecture, options, set())
