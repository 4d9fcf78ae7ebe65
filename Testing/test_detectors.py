"""The detector contract: a backend registered from outside runs through every public command, and the
built-in backends declare what the contract asks of them."""

import csv
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.data_parallel import weights_digest
from AnomalyFlagLib.detectors import (
    BACKENDS,
    DetectorBackend,
    ScoreComponent,
    TrainingRun,
    TrainingStage,
    backend_class,
    option,
    register_backend,
)
from AnomalyFlagLib.preprocessing import InputSpec
from AnomalyFlagLib.results import LEADING_COLUMNS, TRAILING_COLUMNS
from AnomalyFlagLib.scoring import Scorer
from AnomalyFlagLib.training import train
from conftest import TINY_SIZE, TINY_SLICES, tiny_configs


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


BUILT_IN = ["restoration", "fanogan", "normative", "stylegan2", "ganomaly", "progressive-ganomaly", "ascnet",
            "descargan", "hybrid"]  # fmt: skip
SEED_BACKENDS = ["stylegan2", "ganomaly", "progressive-ganomaly", "ascnet", "descargan", "hybrid"]


def test_every_registered_backend_is_a_built_in_one():
    assert sorted(BACKENDS) == sorted(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", SEED_BACKENDS)
def test_a_seed_backend_trains_reloads_and_scores_deterministically(name, phantom_normal_dir, phantom_anomalous_dir,
                                                                     tmp_path):  # fmt: skip
    backend, architecture, options, preprocess = tiny_configs(name)
    extra = {t.name: phantom_anomalous_dir for t in backend_class(name).training_inputs}
    models = [train(phantom_normal_dir, tmp_path / f"m{k}", backend, architecture, options, preprocess,
                    device="cpu", log=lambda s: None, extra_inputs=extra) for k in range(2)]  # fmt: skip
    bundles = [load_bundle(m) for m in models]
    assert isinstance(bundles[0].backend, backend_class(name))
    digests = [weights_digest(b.backend.networks()) for b in bundles]
    assert digests[0] == digests[1], "the same seed trains the same weights on the CPU"
    meta = json.loads((models[0] / "metadata.json").read_text())
    assert meta["training"]["steps"] == {
        s.name: getattr(options, s.steps_option) for s in backend_class(name).stages(options)
    }
    untrained = backend_class(name)(architecture, bundles[0].backend.inputs)
    assert weights_digest(untrained.networks()) != digests[0], "training changed the weights that were saved"

    case = _scans(phantom_anomalous_dir)[0]
    results = [Scorer(m, device="cpu").score(case) for m in models]
    names = [c.name for c in backend_class(name).components]
    for column in names + ["score", "normalised"]:
        values = results[0].slices[column]
        assert np.isfinite(values).all() and np.array_equal(values, results[1].slices[column]), column
    assert np.array_equal(results[0].heatmap, results[1].heatmap)
    assert results[0].heatmap.max() > 0


@pytest.mark.parametrize("name", SEED_BACKENDS)
def test_a_seed_backend_scores_each_slice_on_its_own(name):
    """Scoring runs in evaluation mode: a slice's maps do not depend on the other slices in the batch
    (the GANomaly reference code scores in training mode, where batch normalisation mixes them)."""
    backend = _tiny_backend(name)
    x, pos, body = _slices(4)
    together = backend.maps(x, pos, body)
    alone = backend.maps(x[1:2], pos[1:2], body[1:2])
    for key, value in together.items():
        assert value.shape == (4, TINY_SIZE, TINY_SIZE) and torch.isfinite(value).all()
        assert torch.allclose(value[1:2], alone[key], atol=1e-5), key


def test_ganomaly_latent_score_is_one_value_per_slice():
    backend = _tiny_backend("ganomaly")
    x, pos, body = _slices(3)
    latent = backend.maps(x, pos, body)["latent"]
    assert torch.equal(latent, latent[:, :1, :1].expand_as(latent)) and not torch.equal(latent[0], latent[1])


def test_progressive_ganomaly_scores_all_patches_in_one_call_and_reassembles_them_exactly(monkeypatch):
    backend = _tiny_backend("progressive-ganomaly")
    arch = backend.architecture
    x, pos, body = _slices(2)
    calls = []
    forward = backend.generator.forward
    monkeypatch.setattr(backend.generator, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k))
    maps = backend.maps(x, pos, body)
    per_side = (TINY_SIZE - arch.patch_size) // arch.patch_stride + 1
    assert calls == [2 * per_side**2], "one batched call for every patch of the two slices"

    # The same maps patch by patch: each pixel the mean over the patches that cover it.
    p, s = arch.patch_size, arch.patch_stride
    xw = backend.inputs.channels(x)
    cond = backend._condition(2, TINY_SIZE, TINY_SIZE, pos)
    latent_sum = torch.zeros(2, TINY_SIZE, TINY_SIZE)
    cover = torch.zeros(TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        for top in range(0, TINY_SIZE - p + 1, s):
            for left in range(0, TINY_SIZE - p + 1, s):
                box = (slice(None), slice(None), slice(top, top + p), slice(left, left + p))
                z, _, z2 = forward(xw[box], cond[box])
                latent_sum[:, top : top + p, left : left + p] += ((z - z2) ** 2).mean(dim=1).view(2, 1, 1)
                cover[top : top + p, left : left + p] += 1
    assert torch.allclose(maps["latent"], latent_sum / cover, rtol=1e-4, atol=1e-6)


def test_stylegan2_modulated_convolution_equals_modulating_the_weights():
    from AnomalyFlagLib.detectors.stylegan2_networks import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, w_dim=6)
    x, w = torch.randn(3, 5, 9, 9), torch.randn(3, 6)
    style = conv.affine(w)
    weight = conv.scale * conv.weight[None] * style[:, None, :, None, None]  # (n, out, in, k, k): the paper's form
    weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    expected = torch.cat([F.conv2d(x[i : i + 1], weight[i], padding=1) for i in range(3)])
    assert torch.allclose(conv(x, w), expected, atol=1e-5)


@pytest.mark.parametrize("space, distinct", [("w", False), ("w+", True)])
def test_stylegan2_encoder_space(space, distinct):
    backend = _tiny_backend("stylegan2", encoder_space=space)
    torch.nn.init.normal_(backend.encoder.head.weight)  # a trained encoder: not the zero start at w_avg
    x, pos, _ = _slices(2)
    ws = backend.encoder(backend.inputs.channels(x), pos, backend.generator.mapping.w_avg)
    assert ws.shape == (2, backend.generator.synthesis.num_ws, backend.architecture.latent_dim)
    assert (not torch.allclose(ws[:, 0], ws[:, 1])) == distinct


def test_the_hybrid_holds_both_members_under_their_own_names():
    from AnomalyFlagLib.config import FieldError, config_from_dict, config_to_dict
    from AnomalyFlagLib.detectors.hybrid import HybridArchitecture, HybridOptions

    backend = _tiny_backend("hybrid")
    local, stylegan = _tiny_backend("restoration"), _tiny_backend("stylegan2")
    assert set(backend.networks()) == set(local.networks()) | {"global_" + n for n in stylegan.networks()}
    x, pos, body = _slices(2)
    maps = backend.maps(x, pos, body)
    assert list(maps) == [c.name for c in backend.components]
    for name, value in backend.local.maps(x, pos, body).items():
        assert torch.equal(maps[name], value), name
    whole = backend.stylegan.maps(x, pos, body)["reconstruction"]
    assert torch.allclose(maps["global"], whole) and maps["global"].shape == (2, TINY_SIZE, TINY_SIZE)

    options = HybridOptions()
    assert options.iterations == 6000 and options.global_gan_iterations == 2000  # each member's default
    assert config_from_dict(HybridOptions, config_to_dict(options)) == options
    with pytest.raises(FieldError, match="global_latent_dim"):
        config_from_dict(HybridArchitecture, {**config_to_dict(HybridArchitecture()), "global_latent_dim": 1})
    with pytest.raises(FieldError, match="global_share"):
        dataclasses.replace(options, global_share=1.0).validate()
    shares = {s.name: s.share for s in backend_class("hybrid").stages(options)}
    assert shares["restoration"] == pytest.approx(0.6) and shares["gan"] + shares["encoder"] == pytest.approx(0.4)


def test_seed_backends_offer_their_options_in_train_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--encoder-space", "--r1-gamma", "--path-length-weight", "--latent-weight", "--reconstruction-weight",
                 "--patch-size", "--patch-stride", "--start-size", "--grow-iterations", "--global-share",
                 "--global-latent-dim", "--global-no-position"):  # fmt: skip
        assert flag in out, flag


def _scans(folder):
    return sorted(p for p in folder.glob("*.nrrd") if not p.name.endswith(("_anomaly.nrrd", "_organs.nrrd")))


def _tiny_backend(name, **changes):
    _, architecture, _, preprocess = tiny_configs(name)
    architecture = dataclasses.replace(architecture, **changes)
    torch.manual_seed(0)
    return backend_class(name)(architecture, InputSpec.from_config(preprocess)).eval()


def _slices(n):
    from AnomalyFlagLib.phantom import make_phantom

    volume = make_phantom(n + 4, TINY_SIZE, (400 / TINY_SIZE, 400 / TINY_SIZE, 5.0), seed=3).image[2 : 2 + n]
    x = torch.from_numpy(volume.astype("float32"))[:, None]
    return x, torch.linspace(0.2, 0.8, n), torch.ones_like(x, dtype=torch.bool)


@pytest.mark.parametrize("name, flag", [("ascnet", "--unlabelled"), ("descargan", "--patients")])
def test_a_backend_refuses_to_train_without_its_other_input_or_with_one_it_does_not_take(
    name, flag, phantom_normal_dir, phantom_anomalous_dir, tmp_path, capsys
):
    args = ["train", "--backend", name, "--input", str(phantom_normal_dir), "--output", str(tmp_path / "m"),
            "--image-size", str(TINY_SIZE), "--fov-mm", "0", "--device", "cpu"]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"backend '{name}' also trains on {flag}" in err and not (tmp_path / "m").exists()
    other = "--patients" if flag == "--unlabelled" else "--unlabelled"
    assert main(args + [flag, str(phantom_anomalous_dir), other, str(phantom_anomalous_dir)]) != 0
    assert f"backend '{name}' does not take {other}" in capsys.readouterr().err


def test_patients_are_the_slices_a_reviewer_confirmed_abnormal(flagging_model, phantom_anomalous_dir, tmp_path):
    from AnomalyFlagLib.errors import InputError
    from AnomalyFlagLib.review.session import ReviewSession
    from AnomalyFlagLib.training_slices import load_training_input

    case = _scans(phantom_anomalous_dir)[0]
    scored = tmp_path / "scored"
    assert main(["score", "--model", str(flagging_model), "--input", str(case), "--output", str(scored), "--device",
                 "cpu"]) == 0  # fmt: skip
    preprocess = load_bundle(flagging_model).preprocess
    name = case.name[: -len(".nrrd")]
    with ReviewSession.open(scored, name, "ann") as session:
        queue = [q["slice"] for q in session.queue]
        session.decide(queue[0], "accepted")
    with pytest.raises(InputError, match="confirmed abnormal"):
        load_training_input("patients", scored, preprocess)
    with ReviewSession.open(scored, name, "ann") as session:
        session.decide(queue[0], "abnormal")
        session.decide(queue[-1], "abnormal")
    patients = load_training_input("patients", scored, preprocess)
    assert sorted(patients.slice_index.tolist()) == sorted({queue[0], queue[-1]})

    # A folder of abnormal scans: the slices their anomaly masks mark.
    from_masks = load_training_input("patients", phantom_anomalous_dir, preprocess)
    marked = sum(int(sitk.GetArrayFromImage(sitk.ReadImage(str(m))).any(axis=(1, 2)).sum())
                 for m in phantom_anomalous_dir.glob("*_anomaly.nrrd"))  # fmt: skip
    assert len(from_masks) == marked > 0
    unlabelled = load_training_input("unlabelled", phantom_anomalous_dir, preprocess)
    assert len(unlabelled) == 2 * TINY_SLICES, "unlabelled scans: every slice, masks ignored"


def test_a_stage_ends_when_the_backend_reports_convergence():
    from AnomalyFlagLib.detectors.ascnet import StoppingRule

    rule = StoppingRule()
    assert [rule.update(v, patience=2) for v in (3.0, 2.0, 2.5, 2.1, 1.0, 1.5, 1.5)] == [
        False, False, False, True, False, False, True
    ]  # fmt: skip

    class Nowhere:
        def restore(self, *a):
            return {}

        def save(self, *a):
            pass

    run = TrainingRun(torch.device("cpu"), 0, Nowhere(), lambda *a: None, lambda: False)
    seen = []
    run.run_stage(TrainingStage("s", "s"), 10, lambda k, f: seen.append(k) or {"converged": float(k == 3)}, {}, {})
    assert seen == [0, 1, 2, 3] and run.steps_done == {"s": 4}


@pytest.mark.slow
def test_a_hybrid_assembled_from_two_trained_bundles_scores_as_its_members(phantom_normal_dir, tiny_model, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import assemble_hybrid

    backend, architecture, options, preprocess = tiny_configs("stylegan2")
    stylegan = train(phantom_normal_dir, tmp_path / "sg2", backend, architecture, options, preprocess, device="cpu",
                     log=lambda s: None)  # fmt: skip
    out = tmp_path / "hybrid"
    args = ["--restoration", str(tiny_model), "--stylegan2", str(stylegan), "--calibrate-on", str(phantom_normal_dir)]
    assert assemble_hybrid.main(args + ["--output", str(out)]) == 0
    from AnomalyFlagLib.training import recalibrate

    case = _scans(phantom_normal_dir)[0]
    members = [recalibrate(m, phantom_normal_dir, tmp_path / f"re{k}", log=lambda s: None)
               for k, m in enumerate((tiny_model, stylegan))]  # fmt: skip
    hybrid, members = Scorer(out).score(case), [Scorer(m).score(case) for m in members]
    for name in ("reconstruction", "feature", "discriminative"):  # statistics fitted on the same slices
        assert np.allclose(hybrid.slices[name], members[0].slices[name], atol=1e-5), name
    assert np.allclose(hybrid.slices["global"], members[1].slices["reconstruction"], atol=1e-5)
    with pytest.raises(SystemExit, match="not 'stylegan2'"):
        assemble_hybrid.main(["--restoration", str(tiny_model), "--stylegan2", str(tiny_model), "--calibrate-on",
                              str(phantom_normal_dir), "--output", str(tmp_path / "no")])  # fmt: skip
