"""The one atomic write (atomic_path) and the one JSON encoding (dumps_json)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from AnomalyFlagLib import atomic_files
from AnomalyFlagLib.atomic_files import atomic_path, dumps_json, write_json_atomic, write_text_atomic
from AnomalyFlagLib.io.scored_case import remove_leftovers


def _names(folder: Path):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def events(monkeypatch):
    """Every os.fsync (as ('fsync', inode)) and os.replace (as ('replace', name)), in order."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_an_error_in_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "report.json"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_path(final) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk gone")
    assert final.read_text() == "old" and _names(tmp_path) == ["report.json"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "bundle") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(b"x")
            raise KeyboardInterrupt
    assert _names(tmp_path) == ["report.json"]


def test_a_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, events):
    final = write_text_atomic(tmp_path / "a.csv", "x\n")
    assert final.read_text() == "x\n" and _names(tmp_path) == ["a.csv"]
    file_sync = ("fsync", final.stat().st_ino)
    folder_sync = ("fsync", tmp_path.stat().st_ino)
    assert file_sync in events and folder_sync in events
    assert events.index(file_sync) < events.index(("replace", "a.csv")) < events.index(folder_sync)


def test_a_folder_replaces_the_old_one_with_every_file_fsynced(tmp_path, events):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.safetensors").write_bytes(b"old")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "metadata.json").write_text("{}")
        (tmp / "encoder.safetensors").write_bytes(b"new")
    assert _names(final) == ["encoder.safetensors", "metadata.json"] and _names(tmp_path) == ["model"]
    synced = {ino for what, ino in events if what == "fsync"}
    assert {(final / n).stat().st_ino for n in _names(final)} | {final.stat().st_ino} <= synced


def test_an_exclusive_commit_never_replaces_a_file(tmp_path):
    taken = tmp_path / "v1"
    taken.write_text("first")
    staged = atomic_path(taken)
    staged.tmp.write_text("second")
    with pytest.raises(FileExistsError):
        staged.commit(exclusive=True)
    assert staged.commit(tmp_path / "v2", exclusive=True) == tmp_path / "v2"
    assert (taken.read_text(), (tmp_path / "v2").read_text()) == ("first", "second")
    assert _names(tmp_path) == ["v1", "v2"]


def test_the_temporary_of_a_killed_writer_is_removed_as_a_leftover(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(atomic_files.os, "getpid", lambda: int(dead.stdout))
    for staged in (atomic_path(tmp_path / "x_summary.json"), atomic_path(tmp_path / "x.nii.gz", suffix=".nii.gz")):
        staged.tmp.write_text("killed before the rename")
    monkeypatch.undo()
    assert len(remove_leftovers(tmp_path)) == 2 and _names(tmp_path) == []


def test_json_has_null_for_nan_and_infinity_and_plain_numbers_for_numpy(tmp_path):
    data = {
        "nan": math.nan,
        "inf": [np.inf, -math.inf, np.float32(np.nan)],
        "numpy": {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(3, dtype=np.uint8)},
        "matrix": np.array([[1.5, np.nan]]),
        "tuple": (1, "two"),
        "path": Path("a") / "b",
        7: "key",
    }
    expected = {
        "nan": None,
        "inf": [None, None, None],
        "numpy": {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2]},
        "matrix": [[1.5, None]],
        "tuple": [1, "two"],
        "path": str(Path("a") / "b"),
        "7": "key",
    }
    assert json.loads(dumps_json(data)) == expected
    assert "NaN" not in dumps_json(data) and "Infinity" not in dumps_json(data)
    path = write_json_atomic(tmp_path / "r.json", data)
    assert path.read_text(encoding="utf-8") == json.dumps(expected, indent=2) + "\n"
    assert type(json.loads(dumps_json(np.int64(3)))) is int
