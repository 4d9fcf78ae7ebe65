"""The detector contract: a backend registered from outside runs through every public command, and the
built-in backends declare what the contract asks of them."""

import csv
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.detectors import (
    BACKENDS,
    DetectorBackend,
    ScoreComponent,
    TrainingStage,
    backend_class,
    option,
    register_backend,
)
from AnomalyFlagLib.results import LEADING_COLUMNS, TRAILING_COLUMNS
from conftest import TINY_SIZE


@dataclass
class MeanArchitecture:
    gain: float = option(1.0, "multiplies the deviation map")


@dataclass
class MeanOptions:
    iterations: int = option(4, "steps of the running mean")


class _Mean(torch.nn.Module):
    def __init__(self, channels, size):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, size, size))


class MeanBackend(DetectorBackend):
    """Deviation from the mean training slice: small, but a real detector of bright and dark spots."""

    name = "test-mean"
    summary = "distance to the mean normal slice (a test backend)"
    Architecture = MeanArchitecture
    Options = MeanOptions
    components = (ScoreComponent("deviation", "|x - mean normal slice| in window units"),)

    @classmethod
    def tiny(cls):
        return MeanArchitecture(), MeanOptions()

    def __init__(self, architecture, inputs):
        super().__init__(architecture, inputs)
        self.mean = _Mean(inputs.num_channels, inputs.image_size)

    def networks(self):
        return {"mean": self.mean}

    @classmethod
    def stages(cls, options):
        return (TrainingStage("mean", "running mean", 1.0, "iterations"),)

    def fit(self, data, options, run):
        def step(k, fraction):
            idx = torch.randint(len(data), (8,), generator=run.generator)
            batch = self.inputs.channels(data.images[idx]).mean(dim=0, keepdim=True)
            self.mean.mean.mul_(k / (k + 1)).add_(batch / (k + 1))
            return {"seen": float(k + 1)}

        run.run_stage(self.stages(options)[0], options.iterations, step, self.networks(), {})

    def maps(self, x, pos, body):
        return {"deviation": self.architecture.gain * (self.inputs.channels(x) - self.mean.mean).abs().mean(dim=1)}


@pytest.fixture()
def mean_backend():
    register_backend(MeanBackend)
    yield MeanBackend
    BACKENDS.pop(MeanBackend.name)


@pytest.mark.slow
def test_a_registered_backend_runs_through_every_public_command(
    mean_backend, phantom_normal_dir, phantom_anomalous_dir, tmp_path, capsys
):
    model = tmp_path / "mean_model"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "backend 'test-mean'" in capsys.readouterr().out

    rc = main(["train", "--backend", "test-mean", "--input", str(phantom_normal_dir), "--output", str(model),
               "--image-size", str(TINY_SIZE), "--fov-mm", "0", "--device", "cpu", "--iterations", "3",
               "--gain", "2.5"])  # fmt: skip
    assert rc == 0
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["backend"] == "test-mean"
    assert meta["test-mean"] == {"architecture": {"gain": 2.5}, "training_options": {"iterations": 3}}
    assert meta["training"]["steps"] == {"mean": 3}
    assert main(["calibrate", "--model", str(model), "--input", str(phantom_normal_dir), "--device", "cpu",
                 "--false-flag-rate", "0.1"]) == 0  # fmt: skip

    out = tmp_path / "scores"
    assert main(["score", "--model", str(model), "--input", str(phantom_anomalous_dir), "--output", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    with open(out / "anomalous_000_slices.csv") as f:
        header = next(csv.reader(f))
    assert header == list(LEADING_COLUMNS) + ["deviation"] + list(TRAILING_COLUMNS)
    summary = json.loads((out / "anomalous_000_summary.json").read_text())
    assert summary["columns"]["deviation"] == MeanBackend.components[0].description

    assert main(["evaluate", "--model", str(model), "--input", str(phantom_anomalous_dir), "--output",
                 str(tmp_path / "report"), "--device", "cpu"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["slice"]["n_slices"] > 0 and report["pixel"]["pixel_auroc"] is not None

    bundle = load_bundle(model)
    assert isinstance(bundle.backend, MeanBackend) and bundle.backend.architecture.gain == 2.5
    assert bundle.calibration.target_false_flag_rate == 0.1
    assert float(bundle.backend.mean.mean.abs().sum()) > 0, "the trained statistics were saved and reloaded"


def test_options_of_another_backend_are_refused(mean_backend, phantom_normal_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--backend", "test-mean", "--input", str(phantom_normal_dir), "--output",
              str(tmp_path / "m"), "--critic-steps", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert "--critic-steps" in err and "test-mean" in err and "--gain" in err
    assert not (tmp_path / "m").exists()


def test_registry_refuses_incomplete_or_clashing_backends(mean_backend):
    class Nameless(DetectorBackend):
        summary = "no name"

    with pytest.raises(TypeError, match="name"):
        register_backend(Nameless)

    clash = type("Clash", (MeanBackend,), {"name": "test-clash", "components": (ScoreComponent("score", "x"),)})
    with pytest.raises(ValueError, match="reserved"):
        register_backend(clash)
    twin = type("Twin", (MeanBackend,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_backend(twin)
    with pytest.raises(ValueError, match="unknown detector backend 'nope'"):
        backend_class("nope")


@pytest.mark.parametrize("name", ["restoration", "fanogan", "normative"])
def test_built_in_backends_declare_the_contract(name):
    cls = backend_class(name)
    assert cls.summary and cls.components and all(c.description for c in cls.components)
    architecture, options = cls.Architecture(), cls.Options()
    for config in (architecture, options):
        for f in dataclasses.fields(config):
            assert f.metadata.get("help"), f"{name}: option {f.name} has no help text"
    stages = cls.stages(options)
    assert stages and abs(sum(s.share for s in stages) - 1.0) < 1e-6
    for stage in stages:
        assert stage.steps_option is None or hasattr(options, stage.steps_option)
