"""Scoring an archive in shards (a scheduler's job array) and resuming a killed run."""

import json
import os

import pytest
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.io.cases import Case, parse_shard, shard_cases


def test_shards_split_a_folder_without_overlap():
    cases = [Case(f"c{i:02d}", f"c{i:02d}.nrrd") for i in (5, 1, 3, 0, 4, 2, 6)]
    shards = [[c.name for c in shard_cases(cases, i, 3)] for i in range(3)]
    assert shards == [["c00", "c03", "c06"], ["c01", "c04"], ["c02", "c05"]]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="I/N"):
            parse_shard(bad)


def _outputs(folder):
    """What a case's outputs say, without the parts that differ between runs (timings, dates)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith("_summary.json"):
            summary = json.loads(path.read_text())
            out[path.name] = {k: summary[k] for k in ("flagged_slices", "threshold", "model_fingerprint", "image")}
        elif path.name.endswith(("_slices.csv", ".nrrd")):
            out[path.name] = path.read_bytes()
    return out


@pytest.mark.slow
def test_two_shards_write_what_one_process_writes_and_a_rerun_resumes(tiny_model, phantom_anomalous_dir, tmp_path,
                                                                      capsys):  # fmt: skip
    common = ["score", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir), "--device", "cpu"]
    assert main(common + ["--output", str(tmp_path / "one")]) == 0
    for i in (0, 1):
        assert main(common + ["--output", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    assert _outputs(tmp_path / "sharded") == _outputs(tmp_path / "one")
    assert "Shard 1 of 2: 1 case(s)" in capsys.readouterr().out

    # a killed run: one case finished, the other's summary never written
    folder = tmp_path / "sharded"
    (folder / "anomalous_001_summary.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(common + ["--output", str(folder), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "anomalous_000: outputs complete, not scored again" in printed and "anomalous_001: " in printed
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after["anomalous_000_slices.csv"] == before["anomalous_000_slices.csv"]  # not rewritten
    assert after["anomalous_001_slices.csv"] != before["anomalous_001_slices.csv"]  # scored again
    assert _outputs(folder) == _outputs(tmp_path / "one")

    # a damaged file means the case is not complete: it is scored again
    os.truncate(folder / "anomalous_000_heatmap.nrrd", 100)
    assert main(common + ["--output", str(folder), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "anomalous_000: outputs complete" not in printed and "anomalous_001: outputs complete" in printed
    assert _outputs(folder) == _outputs(tmp_path / "one")

    assert main(["worklist", "--scores", str(folder), "--output", str(tmp_path / "ranked")]) == 0
    assert "Worklist of 2 case(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_splits_the_cases_over_the_processes_and_rank_0_ranks_them(tiny_model, phantom_anomalous_dir,
                                                                             tmp_path):  # fmt: skip
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "AnomalyFlagLib", "worklist", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir),
           "--output", str(out), "--device", "cpu"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Shard 0 of 2: 1 case(s)") == 1 and run.stdout.count("Shard 1 of 2: 1 case(s)") == 1
    assert run.stdout.count("Worklist of 2 case(s)") == 1  # written once, by rank 0, with both shards' cases
    assert main(["score", "--model", str(tiny_model), "--input", str(phantom_anomalous_dir), "--device", "cpu",
                 "--output", str(tmp_path / "one")]) == 0  # fmt: skip
    assert _outputs(out) == _outputs(tmp_path / "one")
