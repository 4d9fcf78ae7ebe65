"""A case's outputs are published as one set: re-runs replace the whole set, crashes and kills at any
point leave the files of one run only, write failures (full disk, no permission) end in a clear error
and keep the previous set, and leftovers of killed runs are cleaned."""

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from AnomalyFlagLib.cli import EXIT_USAGE, main
from AnomalyFlagLib.errors import OutputError
from AnomalyFlagLib.io import scored_case as outputs_module
from AnomalyFlagLib.io.scored_case import CaseOutputs, prepare_output_dir, write_case_files
from conftest import ROOT
from review_support import make_case_outputs

SCORE_OUTPUTS = ("_slices.csv", "_heatmap.nrrd", "_summary.json", "_flagged.png")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _case_files(folder: Path, case: str):
    return sorted(p for p in folder.iterdir() if p.name.startswith(f"{case}_") and p.name.endswith(SCORE_OUTPUTS))


def _check_one_set(folder: Path, case: str, references: dict) -> str:
    """The run (a key of `references`: {run: {"fingerprint", "files": {name: sha256}}}) that every file
    of `case` on disk can come from ('none' when it has no file); a summary on disk lists exactly the
    files there, with their checksums."""
    files = _case_files(folder, case)
    possible = set(references)
    for p in files:
        if p.name.endswith("_summary.json"):
            fingerprint = json.loads(p.read_text())["model_fingerprint"]
            possible &= {r for r, ref in references.items() if ref["fingerprint"] == fingerprint}
        else:
            possible &= {r for r, ref in references.items() if ref["files"].get(p.name) == _digest(p)}
    assert possible, f"{case}: files of different runs mixed: {[p.name for p in files]}"
    summary = folder / f"{case}_summary.json"
    if summary.exists():
        listed = json.loads(summary.read_text())["sha256"]
        assert {p.name for p in files} - {summary.name} == set(listed)
        assert all(_digest(folder / name) == sha for name, sha in listed.items())
    return "none" if not files else possible.pop() if len(possible) == 1 else "either"


def _reference(folder: Path, cases) -> dict:
    summary = json.loads((folder / f"{cases[0]}_summary.json").read_text())
    files = {p.name: _digest(p) for c in cases for p in _case_files(folder, c) if not p.name.endswith(".json")}
    return {"fingerprint": summary["model_fingerprint"], "files": files}


def test_a_rerun_replaces_the_whole_set_and_lists_it_with_checksums(tmp_path):
    from AnomalyFlagLib.results import CaseResult

    folder = make_case_outputs(tmp_path / "out", "case1")
    (folder / "case1_flagged.png").write_bytes(b"old montage")  # the old run flagged slices, the new one none
    (folder / "case1_slice3.png").write_bytes(b"old snapshot")
    (folder / "case10_flagged.png").write_bytes(b"another case")
    (folder / "case1_review.json").write_text("{}")  # the radiologist's work is not a score output
    write_case_files(CaseResult("case1", *_synthetic_parts()), folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["case10_flagged.png", "case1_review.json", "case1_slices.csv", "case1_summary.json"]
    summary = json.loads((folder / "case1_summary.json").read_text())
    assert summary["files"] == {"slices": "case1_slices.csv", "summary": "case1_summary.json"}
    assert summary["sha256"] == {"case1_slices.csv": _digest(folder / "case1_slices.csv")}
    assert summary["model_fingerprint"] == "fingerprint-b"


def _synthetic_parts(n=6, fingerprint="fingerprint-b"):
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagLib.results import SliceTable

    columns = {"index": np.arange(n), "z_mm": np.arange(n) * 2.0, "position": np.linspace(0, 1, n),
               "score": np.zeros(n), "score_from": np.arange(n), "normalised": np.zeros(n),
               "flagged": np.zeros(n, bool), "in_roi": np.ones(n, bool), "anomaly_fraction": np.zeros(n)}  # fmt: skip
    geometry = Geometry((8, 8, n), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return geometry, SliceTable(columns), 2.0, "tiny", fingerprint


def test_a_crash_at_any_step_of_publishing_leaves_one_run(tmp_path, monkeypatch):
    from AnomalyFlagLib.results import CaseResult

    folder = prepare_output_dir(tmp_path / "out")
    with CaseOutputs(folder, "case1") as outputs:
        outputs.image_path("case1_flagged.png").write_bytes(b"montage of run a")
        outputs.publish(CaseResult("case1", *_synthetic_parts(9, "fingerprint-a")))
    references = {"a": _reference(folder, ["case1"])}
    new = CaseResult("case1", *_synthetic_parts())
    steps = 0
    while True:  # crash before the 1st, 2nd, ... file operation of the publication
        reference_b = tmp_path / f"b{steps}"
        write_case_files(new, reference_b)
        references["b"] = _reference(reference_b, ["case1"])
        trial = tmp_path / f"trial{steps}"
        shutil.copytree(folder, trial)
        calls = []

        def crash(*args, calls=calls, limit=steps, real_replace=os.replace, real_unlink=Path.unlink, **kwargs):
            calls.append(args)
            if len(calls) > limit:
                raise KeyboardInterrupt("killed")
            return (real_replace if len(args) == 2 else real_unlink)(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(outputs_module.os, "replace", crash)
            m.setattr(Path, "unlink", lambda self, *a, **k: crash(self, *a, **k))
            try:
                write_case_files(new, trial)
                finished = True
            except KeyboardInterrupt:
                finished = False
        run = _check_one_set(trial, "case1", references)
        if finished:
            assert run == "b" and (trial / "case1_summary.json").exists()
            break
        steps += 1
    assert steps >= 6, "every removal and every move of the publication was interrupted once"


def test_output_folders_that_cannot_be_written_are_refused_by_name(tiny_model, phantom_normal_dir, tmp_path, capsys):
    scan = str(phantom_normal_dir / "normal_000.nrrd")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, problem in ((a_file, "is a file"), (a_file / "out", "cannot be written"),
                         (Path("/proc/anomalyflag"), "cannot be written")):  # fmt: skip
        rc = main(["score", "--model", str(tiny_model), "--input", scan, "--output", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE and str(out) in err and problem in err, err
        assert "Traceback" not in err


def _score_in_child(args, limit_bytes=None, timeout=300):
    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"))
    return subprocess.Popen([sys.executable, "-m", "AnomalyFlagLib", "score", *args, "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=limit)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_ends_in_a_clear_error_and_keeps_the_previous_set(tiny_model, phantom_normal_dir, tmp_path):
    out = tmp_path / "out"
    scan = str(phantom_normal_dir / "normal_000.nrrd")
    assert main(["score", "--model", str(tiny_model), "--input", scan, "--output", str(out), "--device", "cpu"]) == 0
    before = {p.name: _digest(p) for p in out.iterdir()}
    # A file-size limit makes every write past 2 kB fail as a full disk does (EFBIG instead of ENOSPC).
    proc = _score_in_child(["--model", str(tiny_model), "--input", scan, "--output", str(out)], limit_bytes=2048)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_USAGE, err
    assert "normal_000" in err and "cannot be written" in err and "Traceback" not in err
    assert {p.name: _digest(p) for p in out.iterdir()} == before, "the previous outputs are untouched"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_killing_a_rerun_at_random_points_leaves_one_consistent_set_per_case(
    tiny_model, flagging_model, phantom_normal_dir, phantom_anomalous_dir, tmp_path
):
    scans = tmp_path / "scans"
    scans.mkdir()
    for p in (phantom_anomalous_dir / "anomalous_000.nrrd", phantom_anomalous_dir / "anomalous_001.nrrd",
              phantom_normal_dir / "normal_000.nrrd"):  # fmt: skip
        shutil.copy(p, scans)
    cases = sorted(p.name[: -len(".nrrd")] for p in scans.glob("*.nrrd"))
    references, folders = {}, {}
    for run, model in (("a", tiny_model), ("b", flagging_model)):
        folders[run] = tmp_path / f"reference_{run}"
        args = ["score", "--model", str(model), "--input", str(scans), "--output", str(folders[run]), "--montage"]
        assert main(args + ["--device", "cpu"]) == 0
        references[run] = _reference(folders[run], cases)
    assert references["a"]["files"] != references["b"]["files"], "the two runs must be told apart"
    rerun = ["--model", str(flagging_model), "--input", str(scans), "--montage"]
    started = time.perf_counter()
    proc = _score_in_child(rerun + ["--output", str(tmp_path / "timing")])
    proc.communicate(timeout=300)
    duration = time.perf_counter() - started
    rng = random.Random(0)
    seen = set()
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        shutil.copytree(folders["a"], out)
        proc = _score_in_child(rerun + ["--output", str(out)])
        time.sleep(duration * rng.uniform(0.5, 1.0))  # the first half is mostly importing torch
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        for case in cases:
            seen.add(_check_one_set(out, case, references))
        # The next run cleans what the killed one left and publishes every case.
        proc = _score_in_child(rerun + ["--output", str(out)])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
        assert all(_check_one_set(out, case, references) == "b" for case in cases)
    assert seen - {"a", "b", "none", "either"} == set()


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".x_heatmap.nrrd.part{dead_pid}").write_bytes(b"partial")
    (tmp_path / f".staging{dead_pid}.x").mkdir()
    (tmp_path / f".x_summary.json.tmp{dead_pid}").write_text("{")
    (tmp_path / f".y_heatmap.nrrd.part{os.getpid()}").write_bytes(b"ours, in progress")
    (tmp_path / ".hidden_note").write_text("not ours")
    prepare_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_note", f".y_heatmap.nrrd.part{os.getpid()}"]


def test_an_os_error_while_staging_becomes_an_output_error_and_stages_nothing(tmp_path):
    with pytest.raises(OutputError, match="case 'c1'.*No space left"):
        with CaseOutputs(tmp_path, "c1") as outputs:
            outputs.path("slices").write_text("partial")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_file_system_refusal_anywhere_is_a_clean_error(tiny_model, phantom_normal_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc = main(["calibrate", "--model", str(tiny_model), "--input", str(phantom_normal_dir),
               "--output", str(a_file / "recalibrated"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "anomalyflag calibrate: error:" in err and str(a_file) in err, err
    assert "Traceback" not in err
