"""Training under torchrun: two Gloo processes on the CPU, identical replicas, one bundle, resume after a kill."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from AnomalyFlagLib.bundle import load_bundle
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.data_parallel import weights_digest
from AnomalyFlagLib.phantom import make_phantom_set
from conftest import ROOT, TINY_SIZE

TINY = ["--image-size", str(TINY_SIZE), "--fov-mm", "0", "--base-width", "8", "--levels", "3", "--segmenter-width",
        "8", "--critic-width", "8", "--batch-size", "8", "--crop-size", "32", "--checkpoint-every", "5",
        "--device", "cpu"]  # fmt: skip


def _torchrun(args, program=("-m", "AnomalyFlagLib")):
    """(exit code, output) of `anomalyflag train ARGS` in two processes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
           "train"] + args  # fmt: skip
    run = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace", timeout=600
    )
    return run.returncode, run.stdout


def _state(path):
    bundle = load_bundle(path, device="cpu")
    return bundle, {f"{n}.{k}": v for n, net in bundle.backend.networks().items() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def two_process_model(phantom_normal_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "model"
    code, printed = _torchrun(["--input", str(phantom_normal_dir), "--output", str(out), "--iterations", "60"] + TINY)
    assert code == 0, printed[-3000:]
    return out, printed


@pytest.mark.slow
def test_two_processes_end_with_identical_replicas_and_rank_0_writes_one_bundle(two_process_model):
    out, printed = two_process_model
    assert printed.count("Model bundle written to") == 1 and "2 training processes" in printed
    bundle, _ = _state(out)
    training = bundle.metadata["training"]
    assert training["processes"] == 2 and training["steps"] == {"restoration": 60}
    # each process's own digest of its weights at the end, equal to the digest of what rank 0 saved
    assert training["weights_digests"] == [weights_digest(bundle.backend.networks())] * 2
    assert bundle.calibration.threshold > 0 and not out.with_name("model.partial").exists()


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_model(two_process_model, phantom_normal_dir,
                                                                     tmp_path):  # fmt: skip
    reference, _ = two_process_model
    out = tmp_path / "model"
    args = ["--input", str(phantom_normal_dir), "--output", str(out), "--iterations", "60"] + TINY
    code, printed = _torchrun(args, program=[str(ROOT / "Testing" / "killed_training.py"), "3"])
    assert code != 0, printed[-3000:]  # torchrun saw its rank 1 killed and stopped rank 0
    checkpoint = out.with_name("model.partial") / "checkpoint.pt"
    assert checkpoint.is_file() and not out.exists()
    step = torch.load(checkpoint, weights_only=True)["where"]["step"]
    assert step == 15  # the third checkpoint, every 5 steps

    # one process cannot take over a two-process checkpoint
    single = ["train", "--input", str(phantom_normal_dir), "--output", str(out), "--iterations", "60", "--resume"]
    assert main(single + TINY) != 0 and not out.exists()

    code, printed = _torchrun(args + ["--resume"])
    assert code == 0, printed[-3000:]
    assert "Resuming from the checkpoint: stage 'restoration', step" in printed
    _, a = _state(reference)
    _, b = _state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted"


@pytest.mark.slow
@pytest.mark.parametrize("patients", [3, 1], ids=["shares-of-cases", "shares-of-one-patients-slices"])
def test_normative_statistics_from_two_shares_equal_one_process(phantom_normal_dir, tmp_path, patients):
    data = phantom_normal_dir
    if patients == 1:
        data = tmp_path / "one_patient"  # slices enough to hold out 20 of them
        make_phantom_set(data, num_cases=1, anomalous=False, seed=5, num_slices=48, size=TINY_SIZE)
    args = ["--input", str(data), "--backend", "normative", "--image-size", str(TINY_SIZE), "--fov-mm",
            "0", "--device", "cpu"]  # fmt: skip
    assert main(["train", "--output", str(tmp_path / "one")] + args) == 0
    code, printed = _torchrun(["--output", str(tmp_path / "two")] + args)
    assert code == 0, printed[-3000:]
    _, one = _state(tmp_path / "one")
    _, two = _state(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6) for k in one)
    a = json.loads((tmp_path / "one" / "metadata.json").read_text())["training"]
    b = json.loads((tmp_path / "two" / "metadata.json").read_text())["training"]
    assert a["training_slices"] == b["training_slices"] and b["processes"] == 2


@pytest.mark.slow
def test_a_damaged_case_in_one_share_stops_every_process_with_its_name(phantom_normal_dir, tmp_path):
    data = tmp_path / "normal"
    shutil.copytree(phantom_normal_dir, data)
    damaged = data / "normal_002.nrrd"
    os.truncate(damaged, damaged.stat().st_size // 2)
    code, printed = _torchrun(["--input", str(data), "--output", str(tmp_path / "model")] + TINY)
    assert code != 0 and not (tmp_path / "model").exists()
    assert "normal_002.nrrd" in printed  # the process that read it names it; the other one does not wait
