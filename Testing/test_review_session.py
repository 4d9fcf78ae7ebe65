"""Review sessions: queue order, decisions, resume, locking, refused sidecars, unwritable folders, crashes."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from AnomalyFlagLib.errors import InputError, SessionError
from AnomalyFlagLib.io.scored_case import CaseFiles
from AnomalyFlagLib.review.session import (
    DECISIONS,
    FORMAT,
    ReviewSession,
    break_lock,
    load_sidecar,
    read_lock,
)
from review_support import make_case_outputs, without_write_permission_bypass

FLAGGED = (3, 7, 8, 15, 20, 31)
BY_SCORE = [31, 20, 15, 8, 7, 3]  # normalised scores rise along FLAGGED
BY_ROI = [7, 8, 15, 20, 31, 3]  # anomaly fractions follow (5 * rank) % 6 along FLAGGED

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def _slices(session):
    return [q["slice"] for q in session.queue]


def _run_child(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def case_dir(tmp_path):
    return make_case_outputs(tmp_path, "case1", flagged=FLAGGED)


# ---------------------------------------------------------------------------------------------------
# Queue, decisions, resume


def test_queue_ordered_by_normalised_score(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        assert _slices(s) == BY_SCORE
        scores = [q["normalised"] for q in s.queue]
        assert scores == sorted(scores, reverse=True)
        assert s.progress() == (0, 6)
        assert s.next_pending()["slice"] == 31


def test_queue_ordered_by_roi_fraction_when_scored_with_a_segmentation(tmp_path):
    make_case_outputs(tmp_path, "case1", flagged=FLAGGED, roi=True)
    with ReviewSession.open(tmp_path, "case1", "ann", order="roi") as s:
        assert _slices(s) == BY_ROI
        fractions = [q["anomaly_fraction"] for q in s.queue]
        assert fractions == sorted(fractions, reverse=True)
    with ReviewSession.open(tmp_path, "case1", "ann", order="auto") as s:
        assert s.order == "roi" and _slices(s) == BY_ROI


def test_roi_order_needs_a_case_scored_with_a_segmentation(case_dir):
    with pytest.raises(InputError, match="without a segmentation"):
        ReviewSession.open(case_dir, "case1", "ann", order="roi")
    assert not CaseFiles(case_dir, "case1").lock.exists()
    with ReviewSession.open(case_dir, "case1", "ann", order="auto") as s:
        assert s.order == "normalised"


def test_decisions_recorded_with_reviewer_time_note_and_change(case_dir):
    before = datetime.utcnow().replace(microsecond=0)
    change = {"dice": 0.8, "changed_voxels": 12, "original_voxels": 40, "edited_voxels": 35}
    with ReviewSession.open(case_dir, "case1", "Dr Ann") as s:
        s.decide(31, "accepted")
        s.decide(
            20, "recontoured", note="liver edge missed", change=change, label_path=case_dir / "case1_seg_v1.seg.nrrd"
        )
        s.decide(15, "skipped", note="motion artefact")
        assert s.progress() == (3, 6)
        assert s.next_pending()["slice"] == 8
    data = json.loads(CaseFiles(case_dir, "case1").sidecar.read_text())
    assert data["format"] == FORMAT and data["case"] == "case1"
    assert data["model"]["fingerprint"] == "model-a-fingerprint"
    records = data["decisions"]
    assert [(r["slice"], r["decision"]) for r in records] == [(31, "accepted"), (20, "recontoured"), (15, "skipped")]
    assert all(r["reviewer"] == "Dr Ann" for r in records)
    for r in records:
        assert r["time"].endswith("Z")
        t = datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert before <= t.replace(microsecond=0) <= datetime.utcnow()
    assert records[1]["note"] == "liver edge missed" and records[1]["change"] == change
    assert records[1]["label"] == "case1_seg_v1.seg.nrrd"
    assert records[0]["change"] is None and records[2]["note"] == "motion artefact"


def test_invalid_decisions_are_rejected_and_not_saved(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        with pytest.raises(InputError, match="decision must be one of"):
            s.decide(31, "maybe")
        with pytest.raises(InputError, match="not in the review queue"):
            s.decide(5, "accepted")
        with pytest.raises(InputError, match="recontoured"):
            s.decide(31, "accepted", change={"dice": 1, "changed_voxels": 0, "original_voxels": 0,
                                             "edited_voxels": 0})  # fmt: skip
        with pytest.raises(InputError, match="lacks"):
            s.decide(31, "recontoured", change={"dice": 0.5})
        assert s.progress() == (0, 6)
    assert load_sidecar(case_dir, "case1")["decisions"] == []


def test_resume_after_reopen_starts_at_first_undecided(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
        s.decide(15, "skipped")  # out of order: 20 stays pending
    with ReviewSession.open(case_dir, "case1", "bob") as s:
        assert s.progress() == (2, 6)
        assert s.next_pending()["slice"] == 20
        assert [q["slice"] for q in s.pending()] == [20, 8, 7, 3]
        s.decide(20, "accepted")
        assert s.decision_for(31)["reviewer"] == "ann" and s.decision_for(20)["reviewer"] == "bob"
    data = load_sidecar(case_dir, "case1")
    assert [x["reviewer"] for x in data["sessions"]] == ["ann", "bob"]


def test_redecide_and_undo(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
        s.decide(31, "recontoured", note="second look")
        assert s.decision_for(31)["decision"] == "recontoured"
        assert s.progress() == (1, 6)
        assert s.undo_last()["decision"] == "recontoured"
        assert s.decision_for(31)["decision"] == "accepted"
        assert s.undo_last()["slice"] == 31
        assert s.undo_last() is None
        assert s.progress() == (0, 6)
    assert load_sidecar(case_dir, "case1")["decisions"] == []


def test_complete_review(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        while (item := s.next_pending()) is not None:
            s.decide(item["slice"], "accepted")
        assert s.complete and s.progress() == (6, 6)
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        assert s.next_pending() is None


def test_image_path_recorded_and_missing_outputs_refused(case_dir, tmp_path):
    image = tmp_path / "images" / "case1.nrrd"
    with ReviewSession.open(case_dir, "case1", "ann", image_path=image) as s:
        assert s.image_path == str(image.resolve())
    with ReviewSession.open(case_dir, "case1", "ann") as s:  # kept on resume
        assert s.image_path == str(image.resolve())
    with pytest.raises(SessionError, match="score the case first"):
        ReviewSession.open(case_dir, "other", "ann")
    with pytest.raises(InputError, match="reviewer"):
        ReviewSession.open(case_dir, "case1", "  ")


# ---------------------------------------------------------------------------------------------------
# Refused sidecars: the file is never changed


def _refused(case_dir, match, **kwargs):
    paths = CaseFiles(case_dir, "case1")
    before = paths.sidecar.read_bytes()
    with pytest.raises(SessionError, match=match) as info:
        ReviewSession.open(case_dir, "case1", "ann", **kwargs)
    assert paths.sidecar.read_bytes() == before, "a refused sidecar must stay byte-identical"
    assert not paths.lock.exists(), "a refused open must not leave its lock behind"
    assert sorted(p.name for p in Path(case_dir).iterdir() if p.name.startswith(".")) == []
    return str(info.value)


def test_sidecar_from_another_model_is_refused_and_kept(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
    make_case_outputs(case_dir, "case1", flagged=FLAGGED, model_fingerprint="model-b-fingerprint")
    message = _refused(case_dir, "another model")
    assert "model-a-fingerprint" in message and "model-b-fingerprint" in message
    # the loaded model must also match the outputs
    make_case_outputs(case_dir, "case1", flagged=FLAGGED, model_fingerprint="model-a-fingerprint")
    _refused(case_dir, "not by the model in use", model_fingerprint="model-c-fingerprint")
    with ReviewSession.open(case_dir, "case1", "ann", model_fingerprint="model-a-fingerprint") as s:
        assert s.progress() == (1, 6)


def test_sidecar_from_another_image_is_refused_and_kept(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann", image_fingerprint="sha256:aaaa") as s:
        s.decide(31, "accepted")
    _refused(case_dir, "another image", image_fingerprint="sha256:bbbb")  # same grid, other voxels
    with ReviewSession.open(case_dir, "case1", "ann", image_fingerprint="sha256:aaaa") as s:
        assert s.progress() == (1, 6)
    make_case_outputs(case_dir, "case1", flagged=FLAGGED, spacing=(0.8, 0.8, 2.5))  # another grid
    message = _refused(case_dir, "another image")
    assert "0.8x0.8x2.5" in message


def test_rescored_case_is_refused_and_kept(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
    make_case_outputs(case_dir, "case1", flagged=(3, 7, 9))
    _refused(case_dir, "scored again")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"format": "something-else", "format_version": 1}',
        b'{"format": "anomalyflag-review", "format_version": 1, "case": "case1"}',
        b"\xff\xfe\x00garbage",
    ],
    ids=["invalid-json", "empty", "other-format", "missing-entries", "binary"],
)
def test_damaged_sidecar_is_refused_and_kept(case_dir, content):
    CaseFiles(case_dir, "case1").sidecar.write_bytes(content)
    _refused(case_dir, "damaged")


def test_truncated_and_newer_sidecars_are_refused_and_kept(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
    path = CaseFiles(case_dir, "case1").sidecar
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    _refused(case_dir, "damaged")
    data = json.loads(full)
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    _refused(case_dir, "newer AnomalyFlag")
    data["format_version"] = 1
    data["decisions"][0]["decision"] = "maybe"
    path.write_text(json.dumps(data))
    _refused(case_dir, "damaged")
    data["decisions"][0]["decision"] = "accepted"
    for sessions in ("ann", [1, 2], {"reviewer": "ann"}):
        data["sessions"] = sessions
        path.write_text(json.dumps(data))
        _refused(case_dir, "'sessions'")


def test_confirmed_abnormal_is_a_decision_and_a_version_1_sidecar_is_upgraded(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
    path = CaseFiles(case_dir, "case1").sidecar
    data = json.loads(path.read_text())
    assert data["format_version"] == 2
    data["format_version"] = 1  # as AnomalyFlag wrote it before "abnormal" existed
    path.write_text(json.dumps(data))
    with ReviewSession.open(case_dir, "case1", "bob") as s:
        assert s.decisions[31]["decision"] == "accepted", "a version 1 sidecar reads as it was"
        pending = s.next_pending()["slice"]
        record = s.decide(pending, "abnormal", note="lesion in segment 7")
        assert record["decision"] == "abnormal" and record["reviewer"] == "bob"
        assert s.progress()[0] == 2, "a confirmed abnormal slice counts as reviewed"
    saved = json.loads(path.read_text())
    assert saved["format_version"] == 2 and saved["decisions"][-1]["decision"] == "abnormal"
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        assert s.decisions[pending]["note"] == "lesion in segment 7"


# ---------------------------------------------------------------------------------------------------
# One writer at a time

HOLDER = """
import sys
from AnomalyFlagLib.review.session import ReviewSession
s = ReviewSession.open(sys.argv[1], "case1", sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
if sys.argv[3] == "close":
    s.close()
else:
    import os
    os._exit(0)  # dies holding the lock
"""


def test_second_writer_is_refused_naming_the_holder(case_dir):
    child = _run_child(HOLDER, case_dir, "Dr Holder", "close")
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with pytest.raises(SessionError, match="being reviewed by Dr Holder") as info:
            ReviewSession.open(case_dir, "case1", "ann")
        assert f"pid {child.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        assert read_lock(CaseFiles(case_dir, "case1").lock)["pid"] == child.pid
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    with ReviewSession.open(case_dir, "case1", "ann") as s:  # released: now it opens
        assert s.progress() == (0, 6)


def test_same_process_cannot_open_twice_and_close_releases(case_dir):
    s = ReviewSession.open(case_dir, "case1", "ann")
    with pytest.raises(SessionError, match="being reviewed by ann"):
        ReviewSession.open(case_dir, "case1", "bob")
    s.close()
    s.close()
    assert not CaseFiles(case_dir, "case1").lock.exists()
    with pytest.raises(SessionError, match="closed"):
        s.decide(31, "accepted")
    ReviewSession.open(case_dir, "case1", "bob").close()


def test_stale_lock_of_dead_process_is_taken_over_with_a_warning(case_dir):
    child = _run_child(HOLDER, case_dir, "Dr Gone", "die")
    assert child.stdout.readline().strip() == "ready", child.stderr.read()
    child.communicate("\n", timeout=30)
    lock = CaseFiles(case_dir, "case1").lock
    assert read_lock(lock)["pid"] == child.pid  # left behind
    with pytest.warns(UserWarning, match="taking over the review lock .* Dr Gone"):
        s = ReviewSession.open(case_dir, "case1", "ann")
    assert read_lock(lock)["pid"] == os.getpid() and read_lock(lock)["reviewer"] == "ann"
    s.decide(31, "accepted")
    s.close()


def test_lock_from_another_host_or_freshly_damaged_is_not_taken_over(case_dir):
    lock = CaseFiles(case_dir, "case1").lock
    lock.write_text(json.dumps({"pid": 1, "host": "other-host", "reviewer": "Dr Remote", "time": "x"}))
    with pytest.raises(SessionError, match="Dr Remote .* on other-host"):
        ReviewSession.open(case_dir, "case1", "ann")
    lock.write_text("")  # a writer died while creating it ... just now
    with pytest.raises(SessionError, match="unknown process"):
        ReviewSession.open(case_dir, "case1", "ann")
    old = time.time() - 3600
    os.utime(lock, (old, old))  # ... an hour ago
    with pytest.warns(UserWarning, match="taking over"):
        ReviewSession.open(case_dir, "case1", "ann").close()
    lock.write_text(json.dumps({"pid": 1, "host": "other-host", "reviewer": "Dr Remote", "time": "x"}))
    assert break_lock(case_dir, "case1")["reviewer"] == "Dr Remote"
    ReviewSession.open(case_dir, "case1", "ann").close()


def test_lost_lock_stops_saving_without_losing_state(case_dir):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
        break_lock(case_dir, "case1")
        with pytest.raises(SessionError, match="removed or taken over"):
            s.decide(20, "accepted")
        assert s.progress() == (1, 6)
    assert len(load_sidecar(case_dir, "case1")["decisions"]) == 1


# ---------------------------------------------------------------------------------------------------
# Unwritable output folder

OPEN_ONLY = """
import sys
from AnomalyFlagLib.errors import SessionError
from AnomalyFlagLib.review.session import ReviewSession
try:
    ReviewSession.open(sys.argv[1], "case1", "ann").close()
except SessionError as exc:
    print("SessionError:", exc)
    sys.exit(3)
print("opened")
"""


def _open_in_child(prefix, folder):
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(OPEN_ONLY), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("existing_sidecar", [False, True], ids=["new", "resume"])
def test_unwritable_folder_is_refused_at_open(existing_sidecar):
    prefix = without_write_permission_bypass()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    folder = Path(tempfile.mkdtemp(prefix="anomalyflag-ro-"))
    try:
        make_case_outputs(folder, "case1", flagged=FLAGGED)
        if existing_sidecar:
            with ReviewSession.open(folder, "case1", "ann") as s:
                s.decide(31, "accepted")
        sidecar = CaseFiles(folder, "case1").sidecar
        before = sidecar.read_bytes() if existing_sidecar else None
        control = _open_in_child(prefix, folder)  # the harness itself works on a writable folder
        assert control.returncode == 0 and "opened" in control.stdout, control.stderr
        os.chmod(folder, 0o500)
        refused = _open_in_child(prefix, folder)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert "not writable" in refused.stdout and str(folder) in refused.stdout
        os.chmod(folder, 0o700)
        assert not CaseFiles(folder, "case1").lock.exists()
        if existing_sidecar:
            assert load_sidecar(folder, "case1")["decisions"][0]["slice"] == 31
            assert len(json.loads(sidecar.read_bytes())["sessions"]) == 2  # ann + the control run only
        else:
            assert json.loads(sidecar.read_bytes())["decisions"] == []  # the control run created it
        assert before is None or json.loads(before)["decisions"] == json.loads(sidecar.read_bytes())["decisions"]
    finally:
        os.chmod(folder, 0o700)
        shutil.rmtree(folder)


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
""" + OPEN_ONLY.replace("sys.argv[1]", "sys.argv[1]")


@pytest.mark.parametrize("limit", [0, 600], ids=["lock-not-writable", "sidecar-not-writable"])
def test_full_disk_is_refused_at_open_and_sidecar_kept(case_dir, limit):
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "accepted")
    sidecar = CaseFiles(case_dir, "case1").sidecar
    before = sidecar.read_bytes()
    assert len(before) > 600
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_DISK), str(case_dir), str(limit)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 3, (run.stdout, run.stderr)
    assert "SessionError" in run.stdout
    assert sidecar.read_bytes() == before
    assert not CaseFiles(case_dir, "case1").lock.exists()
    assert [p.name for p in case_dir.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------
# A writer killed mid-run loses at most the decision in flight

WRITER = """
import sys
from AnomalyFlagLib.review.session import DECISIONS, ReviewSession
s = ReviewSession.open(sys.argv[1], "case1", "writer")
queue = [q["slice"] for q in s.queue]
k = len(s.history)
print("ready", k, flush=True)
while True:
    k += 1
    s.decide(queue[(k - 1) % len(queue)], DECISIONS[k % 3], note=f"k={k}")
    print(k, flush=True)
"""


@pytest.mark.slow
def test_killed_writer_keeps_every_returned_decision(case_dir):
    rng = random.Random(1234)
    queue = BY_SCORE
    returned_total = 0
    for _round in range(4):
        child = _run_child(WRITER, case_dir)
        first = child.stdout.readline().split()
        assert first and first[0] == "ready", child.stderr.read()
        assert int(first[1]) >= returned_total  # resumes after everything that returned before
        target = int(first[1]) + rng.randint(3, 40)
        seen = int(first[1])
        while seen < target:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            seen = int(line)
        os.kill(child.pid, signal.SIGKILL)
        # Everything printed before the kill, through the reader readline used: communicate() would read
        # the pipe directly and miss the lines that reader had already buffered.
        rest = child.stdout.read()
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
        child.stdin.close()
        assert child.returncode == -signal.SIGKILL
        returned = max([seen] + [int(v) for v in rest.split()])
        returned_total = returned

        raw = CaseFiles(case_dir, "case1").sidecar.read_bytes()
        data = json.loads(raw)  # parses: never a partial file
        notes = [d["note"] for d in data["decisions"]]
        saved = len(notes)
        assert notes == [f"k={k}" for k in range(1, saved + 1)]
        assert returned <= saved <= returned + 1, f"{returned} returned, {saved} saved"
        for k, record in enumerate(data["decisions"], start=1):
            assert record["slice"] == queue[(k - 1) % len(queue)] and record["decision"] == DECISIONS[k % 3]
        with pytest.warns(UserWarning, match="taking over"):
            with ReviewSession.open(case_dir, "case1", "checker") as s:
                assert len(s.history) == saved
                returned_total = saved
        assert not [p for p in case_dir.iterdir() if ".tmp" in p.name]


def test_label_path_is_stored_relative_to_the_sidecar_folder(case_dir, monkeypatch):
    monkeypatch.chdir(case_dir.parent)  # a path relative to the working directory, as a caller may give it
    with ReviewSession.open(case_dir, "case1", "ann") as s:
        s.decide(31, "recontoured", label_path=Path(case_dir.name) / "case1_seg_v2.seg.nrrd")
        s.decide(20, "recontoured", label_path=(case_dir / "sub" / "case1_seg_v1.seg.nrrd").resolve())
        assert s.decision_for(31)["label"] == "case1_seg_v2.seg.nrrd"
        assert s.decision_for(20)["label"] == "sub/case1_seg_v1.seg.nrrd"
