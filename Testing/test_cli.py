"""The anomalyflag command as a user runs it: outputs, messages and exit codes."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import EXIT_USAGE, main
from conftest import ROOT


def test_score_folder_writes_complete_outputs(tiny_model, phantom_anomalous_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["score", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir), "--output", str(out),
               "--device", "cpu", "--montage"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    for case in ("anomalous_000", "anomalous_001"):
        assert f"{case}:" in printed and "slices flagged" in printed
        summary = json.loads((out / f"{case}_summary.json").read_text())
        image = sitk.ReadImage(str(phantom_anomalous_dir / f"{case}.nrrd"))
        heat = sitk.ReadImage(str(out / f"{case}_heatmap.nrrd"))
        assert heat.GetSize() == image.GetSize() and heat.GetOrigin() == image.GetOrigin()
        assert heat.GetSpacing() == image.GetSpacing() and heat.GetDirection() == image.GetDirection()
        with open(out / f"{case}_slices.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == image.GetSize()[2]
        flagged = [int(r["index"]) for r in rows if r["flagged"] == "1"]
        assert flagged == summary["flagged_slices"]
        assert summary["image"] == str((phantom_anomalous_dir / f"{case}.nrrd").resolve())
        if flagged:
            assert (out / f"{case}_flagged.png").stat().st_size > 10_000
    # Masks and organ maps next to the scans are companions, not cases.
    assert not list(out.glob("*_anomaly_*")) and not list(out.glob("*_organs_*"))


def test_bad_input_fails_clearly_and_leaves_no_complete_looking_output(tiny_model, tmp_path, capsys):
    bad = tmp_path / "scans"
    bad.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 16, 16), 7, np.int16)), str(bad / "flat.nrrd"))
    array = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    array[2, 2, 2] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(bad / "inf.nrrd"))
    out = tmp_path / "out"
    rc = main(["score", "--model", str(tiny_model), "--input", str(bad), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert "flat.nrrd" in err and "constant" in err
    assert "inf.nrrd" in err and "NaN or infinite" in err
    assert "2 of 2 case(s) could not be scored" in err
    assert sorted(p.name for p in out.iterdir()) == []
    assert "Outputs in" not in capsys.readouterr().out


def test_a_failure_part_way_ends_the_progress_line_first():
    import io

    from AnomalyFlagLib.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar("score case", stream=stream, interval=0)
    bar(3, 10)
    bar.close()
    stream.write("case: FAILED: reason\n")
    assert stream.getvalue().splitlines()[-1] == "case: FAILED: reason"
    bar.close()  # a second close, or one after a finished bar, writes nothing
    done = ProgressBar("score case", stream=io.StringIO(), interval=0)
    done(10, 10)
    done.close()
    assert done.stream.getvalue().count("\n") == 1


def test_the_progress_bar_is_ascii_whatever_the_stream_encoding():
    import io

    from AnomalyFlagLib.progress import ProgressBar

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    bar = ProgressBar("train generator", stream=stream, interval=0)
    bar(5, 10, {"loss": 0.25})
    bar(10, 10)
    stream.flush()
    text = stream.buffer.getvalue().decode("ascii")  # a child's stderr is read back in any locale
    assert "10/10" in text and "loss 0.25" in text and text.endswith("\n")


def test_missing_model_and_missing_gpu_are_reported(tiny_model, phantom_anomalous_dir, tmp_path, capsys):
    rc = main(["score", "--model", str(tmp_path / "nope"), "--input", str(phantom_anomalous_dir),
               "--output", str(tmp_path / "o")])  # fmt: skip
    assert rc == EXIT_USAGE and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "no output folder for a model that does not load"
    import torch

    if not torch.cuda.is_available():
        rc = main(["score", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir),
                   "--output", str(tmp_path / "o"), "--device", "cuda"])  # fmt: skip
        assert rc == EXIT_USAGE and "no CUDA GPU" in capsys.readouterr().err


def test_model_names_with_non_ascii_and_line_breaks_give_a_readable_heatmap(tiny_model, phantom_normal_dir,
                                                                          tmp_path):  # fmt: skip
    import shutil

    model = tmp_path / "Leber-Modell Größe 2"
    shutil.copytree(tiny_model, model)
    meta = json.loads((model / "metadata.json").read_text())
    meta["name"] = "Leber-Größe\nspace: right-anterior-superior\\x"
    (model / "metadata.json").write_text(json.dumps(meta))
    scan = sorted(phantom_normal_dir.glob("normal_000.nrrd"))[0]
    for m in (model, tiny_model):
        out = tmp_path / f"out_{m.name[:4]}"
        assert main(["score", "--model", str(m), "--input", str(scan), "--output", str(out), "--device", "cpu"]) == 0
    heat = sitk.ReadImage(str(tmp_path / "out_Lebe" / "normal_000_heatmap.nrrd"))
    assert heat.GetMetaData("anomalyflag_model") == meta["name"]  # escaped in the header, read back whole
    assert heat.GetDirection() == sitk.ReadImage(str(scan)).GetDirection()
    same = sitk.ReadImage(str(tmp_path / "out_tiny" / "normal_000_heatmap.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(heat), sitk.GetArrayFromImage(same))


def test_info_prints_verified_metadata(tiny_model, capsys):
    assert main(["info", "--model", str(tiny_model)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["preprocessing"]["image_size"] == 64
    backend = meta["backend"]
    assert backend == "restoration" and meta[backend]["architecture"]["base_width"] == 8
    assert meta["calibration"]["threshold"] > 0


def test_evaluate_writes_report(tiny_model, phantom_anomalous_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir),
                 "--output", str(out), "--device", "cpu"]) == 0  # fmt: skip
    report = json.loads((out / "evaluation.json").read_text())
    assert report["slice"]["n_slices"] == 48
    assert report["slice"]["n_anomalous"] > 0
    scores, labels = [], []  # the AUROC again, from the published slice tables and the masks
    for case in ("anomalous_000", "anomalous_001"):
        with open(out / "cases" / f"{case}_slices.csv") as f:
            scores += [float(r["normalised"]) for r in csv.DictReader(f)]
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_anomalous_dir / f"{case}_anomaly.nrrd")))
        labels += mask.any(axis=(1, 2)).tolist()
    scores, labels = np.array(scores), np.array(labels)
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    assert report["slice"]["auroc"] == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0)), abs=1e-4)
    assert report["pixel"]["n_anomalous_voxels"] > 0 and report["pixel"]["histogram_exact"]
    assert (out / "evaluation.png").stat().st_size > 20_000
    assert "slice AUROC" in capsys.readouterr().out


@pytest.mark.slow
def test_installed_entry_point_runs(phantom_anomalous_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"))
    proc = subprocess.run([sys.executable, "-m", "AnomalyFlagLib", "score", "--model", str(tmp_path / "x"),
                           "--input", str(phantom_anomalous_dir), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_USAGE
    assert "anomalyflag score: error: model bundle" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_roi_arguments_are_refused_by_name(tiny_model, phantom_normal_dir, tmp_path, capsys):
    import pytest

    scan = str(phantom_normal_dir / "normal_000.nrrd")
    base = ["score", "--model", str(tiny_model), "--input", scan, "--output", str(tmp_path / "o")]
    cases = [("--roi-labels", "abc", "integer labels"), ("--roi-labels", "1,0", "positive"),
             ("--roi-margin-mm", "-5", "outside 0 to 200"), ("--roi-margin-mm", "nan", "outside"),
             ("--roi-margin-mm", "1e9", "outside"), ("--roi-margin-mm", "ten", "not a number")]  # fmt: skip
    for option, value, problem in cases:
        with pytest.raises(SystemExit) as stop:
            main(base + [option, value])
        err = capsys.readouterr().err
        assert stop.value.code == EXIT_USAGE and option in err and problem in err, err
    assert not (tmp_path / "o").exists()


def test_a_margin_given_to_the_library_is_checked_too(tiny_model, phantom_anomalous_dir):
    import pytest
    from AnomalyFlagLib.errors import InputError
    from AnomalyFlagLib.scoring import Scorer

    scan = phantom_anomalous_dir / "anomalous_000.nrrd"
    roi = phantom_anomalous_dir / "anomalous_000_organs.nrrd"
    with pytest.raises(InputError, match="ROI margin nan mm is outside"):
        Scorer(tiny_model, device="cpu").score(scan, roi=roi, roi_margin_mm=float("nan"))
    with pytest.raises(InputError, match="ROI labels"):
        Scorer(tiny_model, device="cpu").score(scan, roi=roi, roi_labels=["liver"])


def test_review_server_refuses_a_missing_folder_before_starting_anything(tmp_path, capsys):
    assert main(["review-server", "--input", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "is not a folder of scored cases" in capsys.readouterr().err


def test_review_server_names_the_extra_when_trame_slicer_is_missing(tmp_path):
    script = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'trame_slicer' else real(name, *a)\n"
        "from AnomalyFlagLib.cli import main\n"
        "sys.exit(main(['review-server', '--input', sys.argv[1]]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag")))  # fmt: skip
    assert run.returncode == EXIT_USAGE, run.stderr
    assert "trame_slicer" in run.stderr and "pip install -e '.[review-server]'" in run.stderr
