"""scripts/quality_benchmark.py: --resume keeps a trained bundle only when it was trained as this run asks; the
tuning set is apart from the test sets."""

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
    with pytest.raises(SystemExit, match="seed: kept 0, asked 1"):
        qb._check_kept(kept, tmp_path, "restoration", architecture, options, set(), seed=1)
    qb._check_kept({**kept, "training": {"seed": 1}}, tmp_path, "restoration", architecture, options, set(), seed=1)


def test_tuning_set_draws_other_subjects_than_the_test_sets(tmp_path):
    """The tuning set (where scoring choices are made) shares no subject with the test sets that judge them,
    has no training set, and is written once."""
    import SimpleITK as sitk

    def images(sets):
        found = {}
        for name, folder in sets.items():
            for path in sorted(folder.glob("*.nrrd")):
                if not path.name.endswith(("_anomaly.nrrd", "_organs.nrrd")):
                    found[(name, path.name)] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        return found

    test = qb.make_phantom_sets(tmp_path / "phantoms", smoke=True)
    tuning = qb.make_phantom_sets(tmp_path / "tuning", smoke=True, tuning=True)
    assert "train" not in tuning and not (tmp_path / "tuning" / "train").exists()
    assert set(tuning) == set(test) - {"train"}
    test_images, tuning_images = images(test), images(tuning)
    assert len(tuning_images) == 2 + 2 * len(qb.ANOMALY_KINDS)
    for key, image in tuning_images.items():
        assert not any(image.shape == other.shape and (image == other).all() for other in test_images.values()), key
    marker = tmp_path / "tuning" / "complete.json"
    written = marker.stat().st_mtime_ns
    assert qb.make_phantom_sets(tmp_path / "tuning", smoke=True, tuning=True) == tuning
    assert marker.stat().st_mtime_ns == written
