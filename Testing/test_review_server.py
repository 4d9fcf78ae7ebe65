"""The browser review app (AnomalyFlagWeb, `anomalyflag review-server`) end to end in headless Chromium driven by
Playwright: phantom cases scored by `anomalyflag worklist`, the server started as users start it, the page
clicked and typed into; the sidecar, lock and label versions checked on disk. Screenshots of every step go
to $ANOMALYFLAG_ARTEFACTS (else the test's tmp folder); look at them.

Skipped with the reason when the machine has no Chromium, Playwright or trame-slicer; with
ANOMALYFLAG_REQUIRE_BROWSER_TESTS=1 (set by .ci/run) a missing piece fails instead."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.io.scored_case import CaseFiles
from AnomalyFlagLib.review.active_learning import read_worklist
from AnomalyFlagLib.review.session import current_decisions, load_sidecar
from review_support import without_write_permission_bypass

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("ANOMALYFLAG_REQUIRE_BROWSER_TESTS", "") not in ("", "0")
START_TIMEOUT_S = 90
STEP_TIMEOUT_MS = 30_000


def _chromium():
    return os.environ.get("ANOMALYFLAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing():
    """Why the browser tests cannot run here, or None."""
    if sys.version_info < (3, 10):
        return "the review server needs Python 3.10+"
    for module in ("trame_slicer", "playwright"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[test]')"
    if _chromium() is None:
        return "no Chromium on this machine (apt-get install chromium)"
    return None


MISSING = _missing()
if MISSING and REQUIRED:
    raise RuntimeError(f"browser tests are required (ANOMALYFLAG_REQUIRE_BROWSER_TESTS) but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


# ------------------------------------------------------------------ data, server, browser


@pytest.fixture(scope="module")
def scored_folder(flagging_model, phantom_anomalous_dir, tmp_path_factory):
    """The anomalous phantoms (image, organ label map = the automatic segmentation) scored by `anomalyflag
    worklist`."""
    scans = tmp_path_factory.mktemp("web_scans")
    for f in phantom_anomalous_dir.iterdir():
        shutil.copy(f, scans / f.name)
    out = tmp_path_factory.mktemp("web_outputs")
    rc = main(["worklist", "--model", str(flagging_model), "--input", str(scans), "--output", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture
def outputs(scored_folder, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(scored_folder, copy)
    os.chmod(copy, 0o755)
    return copy


@pytest.fixture
def artefacts(request, tmp_path):
    base = os.environ.get("ANOMALYFLAG_ARTEFACTS")
    folder = (Path(base) if base else tmp_path / "screenshots") / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReviewServer:
    """`anomalyflag review-server` as a child process (the CLI execs the server: its pid is the server's)."""

    def __init__(self, folder, reviewer, log_path, prefix=(), host=None):
        self.port = _free_port()
        self.host = host or "127.0.0.1"
        self.url = f"http://{host or 'localhost'}:{self.port}/"
        argv = [*prefix, sys.executable, "-m", "AnomalyFlagLib", "review-server", "--input", str(folder),
                "--port", str(self.port), "--reviewer", reviewer]  # fmt: skip
        if host:
            argv += ["--host", host]
        paths = [str(ROOT / "AnomalyFlag"), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}): {self.log()[-3000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not listen within {START_TIMEOUT_S} s: {self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self):
        """SIGKILL: no clean-up at all, as when the machine or the process dies."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def serve():
    """Starts a `ReviewServer` (same arguments) that is stopped when the test ends."""
    started = []

    def start(*args, **kwargs):
        started.append(ReviewServer(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


class Page:
    """One browser tab on the review page, with the waits the steps need and a screenshot per step."""

    def __init__(self, browser, url, artefacts):
        self.page = browser.new_page(viewport={"width": 1400, "height": 860})
        self.page.set_default_timeout(STEP_TIMEOUT_MS)
        self.url = url
        self.artefacts = artefacts
        self.shots = []
        self.open()

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_selector("#case-text", state="attached")
        self.wait_for_text("#case-text", "of")
        self.wait_for_view()

    def reload(self):
        self.page.reload()
        self.page.wait_for_selector("#case-text", state="attached")
        self.wait_for_text("#case-text", "of")
        self.wait_for_view()

    def wait_for_view(self):
        """The slice view's streamed image is in the page and decoded."""
        self.page.wait_for_function(
            "() => { const i = document.querySelector('#slice-view img.image-display-area');"
            " return i && i.complete && i.naturalWidth > 100; }"
        )

    def text(self, selector) -> str:
        return self.page.inner_text(selector).strip()

    def wait_for_text(self, selector, expected):
        self.page.wait_for_function(
            "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
            arg=[selector, expected],
        )
        return self.text(selector)

    def stroke(self, dx=-60, dy=-40, steps=20):
        """A mouse drag across the slice view from (centre + (dx, dy)) to (centre - (dx, dy))."""
        box = self.page.locator("#slice-view img.image-display-area").bounding_box()
        cx, cy = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
        self.page.mouse.move(cx + dx, cy + dy)
        self.page.mouse.down()
        for step in range(1, steps + 1):
            t = step / steps
            self.page.mouse.move(cx + dx * (1 - 2 * t), cy + dy * (1 - 2 * t))
            time.sleep(0.05)
        self.page.mouse.up()

    def shot(self, name):
        time.sleep(1.0)  # the next streamed frame of the view
        path = self.artefacts / f"{len(list(self.artefacts.glob('*.png'))) + 1:02d}_{name}.png"  # one run per test
        self.page.screenshot(path=str(path))
        self.shots.append(path)
        return path

    def close(self):
        self.page.close()


def _sidecar(folder, case):
    data = load_sidecar(folder, case)
    assert data is not None, f"no sidecar for {case}"
    return data, current_decisions(data)


def _first_case_with_flags(folder, minimum):
    rows = read_worklist(folder / "worklist.csv")
    assert int(rows[0]["flagged_slices"]) >= minimum, rows[0]
    return rows[0]["case"], int(rows[0]["flagged_slices"])


# ------------------------------------------------------------------ the review loop


@pytest.mark.slow
def test_review_loop_in_the_browser(browser, outputs, artefacts, serve, tmp_path):
    case, flagged = _first_case_with_flags(outputs, 3)
    server = serve(outputs, "Dr Web", tmp_path / "server1.log")
    page = Page(browser, server.url, artefacts)
    assert page.text("#case-text").startswith(f"{case} (1 of ")
    assert page.text("#progress-text") == f"0 of {flagged} reviewed"
    data, decided = _sidecar(outputs, case)
    queue = [q["slice"] for q in data["queue"]]
    assert decided == {} and len(queue) == flagged
    # the first pending slice is shown; the list holds every flagged slice with its score
    assert page.wait_for_text("#view-text", f"slice {queue[0]},")
    for k in queue:
        assert "pending" in page.text(f"#slice-{k}") and "score" in page.text(f"#slice-{k}")
    assert page.page.locator("#threshold-line").count() == 1
    assert page.page.locator("#score-chart circle").count() == flagged
    page.shot("opened")

    # select another flagged slice: the view moves there
    accepted = queue[1]
    page.page.click(f"#slice-{accepted}")
    page.wait_for_text("#view-text", f"slice {accepted},")
    page.shot("flagged_slice_heatmap_outlines")

    # A accepts it (keyboard, as in the module); saved in the sidecar at once
    page.page.keyboard.press("a")
    page.wait_for_text(f"#decision-{accepted}", "accepted")
    assert page.text("#progress-text") == f"1 of {flagged} reviewed"
    assert _sidecar(outputs, case)[1][accepted]["decision"] == "accepted"
    assert _sidecar(outputs, case)[1][accepted]["reviewer"] == "Dr Web"
    page.shot("accepted")

    # Recontour another: the editor opens on that slice; a paint stroke; Finish saves a new label version
    recontoured = queue[2]
    page.page.click(f"#slice-{recontoured}")
    page.wait_for_text("#view-text", f"slice {recontoured},")
    page.page.click("#recontour")
    page.page.wait_for_selector("#editor-panel")
    assert f"slice {recontoured}" in page.text("#editor-panel")
    page.shot("editor_open")
    page.stroke()  # painted, then undone: the editor's undo
    page.page.wait_for_selector("#undo-edit:not([disabled])")
    page.page.click("#undo-edit")
    page.page.wait_for_selector("#undo-edit[disabled]")
    page.stroke()
    page.page.wait_for_selector("#undo-edit:not([disabled])")
    page.shot("editor_painted")
    assert not CaseFiles(outputs, case).label_version(1).exists()
    page.page.click("#finish")
    page.wait_for_text(f"#decision-{recontoured}", "recontoured")
    label = CaseFiles(outputs, case).label_version(1)
    assert label.is_file()
    record = _sidecar(outputs, case)[1][recontoured]
    assert record["decision"] == "recontoured" and record["label"] == label.name
    assert record["change"]["changed_voxels"] > 0 and record["change"]["dice"] < 1.0
    assert page.text("#progress-text") == f"2 of {flagged} reviewed"
    page.shot("recontoured")

    # reload the page: the decisions and the new label version are shown
    page.reload()
    assert page.text("#progress-text") == f"2 of {flagged} reviewed"
    assert "accepted" in page.text(f"#decision-{accepted}")
    assert "recontoured" in page.text(f"#decision-{recontoured}")
    assert label.name in page.text(f"#slice-{recontoured}")
    assert page.text("#label-text") == f"Label version: {label.name}"
    page.shot("reloaded")

    # S skips the next pending slice; then the server is killed: every decision is in the sidecar
    pending = [k for k in queue if k not in (accepted, recontoured)][0]
    page.wait_for_text("#view-text", f"slice {pending},")
    page.page.keyboard.press("s")
    page.wait_for_text(f"#decision-{pending}", "skipped")
    server.kill()
    raw = CaseFiles(outputs, case).sidecar.read_bytes()
    data, decided = json.loads(raw), _sidecar(outputs, case)[1]
    assert {k: r["decision"] for k, r in decided.items()} == {accepted: "accepted", recontoured: "recontoured",
                                                              pending: "skipped"}  # fmt: skip
    assert CaseFiles(outputs, case).lock.exists()  # left behind by the killed process
    assert sorted(p.name for p in outputs.glob(f"{case}_seg_v*.seg.nrrd")) == [label.name]

    # a new server takes the dead process's lock over and resumes where the review stopped
    server2 = serve(outputs, "Dr Web", tmp_path / "server2.log")
    page2 = Page(browser, server2.url, artefacts)
    assert page2.text("#progress-text") == f"3 of {flagged} reviewed"
    assert "skipped" in page2.text(f"#decision-{pending}")
    page2.shot("resumed_after_kill")
    page.close()
    page2.close()


@pytest.mark.slow
def test_abnormal_undo_next_case_erase_and_cancel(browser, outputs, artefacts, serve, tmp_path):
    case, flagged = _first_case_with_flags(outputs, 1)
    rows = read_worklist(outputs / "worklist.csv")
    server = serve(outputs, "Dr Web", tmp_path / "server.log")
    page = Page(browser, server.url, artefacts)
    first = _sidecar(outputs, case)[0]["queue"][0]["slice"]
    page.page.keyboard.press("x")
    page.wait_for_text(f"#decision-{first}", "confirmed abnormal")
    assert _sidecar(outputs, case)[1][first]["decision"] == "abnormal"
    page.page.click("#undo-decision")
    page.wait_for_text(f"#decision-{first}", "pending")
    assert first not in _sidecar(outputs, case)[1]
    if len(rows) > 1:
        page.page.click("#next-case")
        page.wait_for_text("#case-text", f"{rows[1]['case']} (2 of {len(rows)})")
        page.wait_for_view()
        assert not CaseFiles(outputs, case).lock.exists()  # the previous case is released
        assert CaseFiles(outputs, rows[1]["case"]).lock.exists()
        page.shot("next_case")
        page.page.click("#previous-case")
        page.wait_for_text("#case-text", f"{case} (1 of {len(rows)})")
        page.wait_for_view()

    # Erase on a slice, then Cancel: the edit is undone and nothing is saved or decided
    target = _sidecar(outputs, case)[0]["queue"][0]["slice"]
    page.page.click(f"#slice-{target}")
    page.wait_for_text("#view-text", f"slice {target},")
    page.page.keyboard.press("r")
    page.page.wait_for_selector("#editor-panel")
    page.page.click("#erase")
    page.stroke(dx=-30, dy=0)
    page.page.wait_for_selector("#undo-edit:not([disabled])")
    page.shot("erased")
    page.page.click("#cancel-recontour")
    page.page.wait_for_selector("#editor-panel", state="detached")
    assert "pending" in page.text(f"#decision-{target}") and target not in _sidecar(outputs, case)[1]
    assert not list(outputs.glob(f"{case}_seg_v*.seg.nrrd"))
    # recontouring again and finishing at once measures no change: Cancel restored the segment
    page.page.keyboard.press("r")
    page.page.wait_for_selector("#editor-panel")
    page.page.click("#finish")
    page.wait_for_text(f"#decision-{target}", "recontoured")
    assert _sidecar(outputs, case)[1][target]["change"]["changed_voxels"] == 0
    # and an erase stroke that is finished changes the segment
    second = _sidecar(outputs, case)[0]["queue"][1]["slice"]
    page.page.click(f"#slice-{second}")
    page.wait_for_text("#view-text", f"slice {second},")
    page.page.click("#recontour")
    page.page.wait_for_selector("#editor-panel")
    page.page.click("#erase")
    page.stroke(dx=-30, dy=0)
    page.page.wait_for_selector("#undo-edit:not([disabled])")
    page.page.click("#finish")
    page.wait_for_text(f"#decision-{second}", "recontoured")
    change = _sidecar(outputs, case)[1][second]["change"]
    assert change["changed_voxels"] > 0 and change["dice"] < 1.0
    assert len(list(outputs.glob(f"{case}_seg_v*.seg.nrrd"))) == 2  # one new version per Finish
    page.close()


# ------------------------------------------------------------------ errors in the page


@pytest.mark.slow
def test_second_reviewer_is_refused_in_the_page(browser, outputs, artefacts, serve, tmp_path):
    case, _flagged = _first_case_with_flags(outputs, 1)
    first = serve(outputs, "Dr Ann", tmp_path / "ann.log")
    ann = Page(browser, first.url, artefacts)
    ann.page.keyboard.press("a")
    ann.wait_for_text("#progress-text", "1 of")
    before = CaseFiles(outputs, case).sidecar.read_bytes()
    second = serve(outputs, "Dr Bob", tmp_path / "bob.log")
    bob = Page(browser, second.url, artefacts)
    refused = bob.wait_for_text("#open-error", "Dr Ann")
    assert case in refused
    assert bob.page.locator("#accept").count() == 0  # no review open: nothing to decide
    bob.page.keyboard.press("a")
    bob.wait_for_text("#error-text", "No review is open")
    assert bob.text("#open-error") == refused  # the reason stays in the page
    bob.page.click("#open-review")  # trying again while Dr Ann holds it
    bob.wait_for_text("#open-error", "Dr Ann")
    assert CaseFiles(outputs, case).sidecar.read_bytes() == before
    bob.shot("second_reviewer_refused")
    ann.close()
    bob.close()


@pytest.mark.slow
def test_damaged_sidecar_is_shown_in_the_page(browser, outputs, artefacts, serve, tmp_path):
    case, _flagged = _first_case_with_flags(outputs, 1)
    sidecar = CaseFiles(outputs, case).sidecar
    sidecar.write_text('{"format": "anomalyflag-review", "decisions": [', encoding="utf-8")
    damaged = sidecar.read_bytes()
    server = serve(outputs, "Dr Web", tmp_path / "server.log")
    page = Page(browser, server.url, artefacts)
    error = page.wait_for_text("#open-error", sidecar.name)
    assert "damaged" in error or "cannot be read" in error
    assert sidecar.read_bytes() == damaged  # never repaired silently
    page.shot("damaged_sidecar")
    page.close()


@pytest.mark.slow
def test_unwritable_folder_is_shown_in_the_page(browser, outputs, artefacts, serve, tmp_path):
    prefix = without_write_permission_bypass()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    case, _flagged = _first_case_with_flags(outputs, 1)
    os.chmod(outputs, 0o555)
    try:
        server = serve(outputs, "Dr Web", tmp_path / "server.log", prefix=prefix)
        page = Page(browser, server.url, artefacts)
        error = page.wait_for_text("#open-error", "not writable")
        assert str(outputs) in error
        assert not CaseFiles(outputs, case).sidecar.exists()
        page.shot("unwritable_folder")
        page.close()
    finally:
        os.chmod(outputs, 0o755)


@pytest.mark.slow
def test_host_other_than_localhost_warns_that_there_is_no_authentication(outputs, serve, tmp_path):
    server = serve(outputs, "Dr Web", tmp_path / "server.log", host="127.0.0.2")
    assert "no authentication" in server.log() and "authenticating proxy" in server.log()
    local = serve(outputs, "Dr Web", tmp_path / "local.log")
    assert "no authentication" not in local.log()


def test_page_keys_are_the_review_sections_keys():
    import ast

    from AnomalyFlagWeb.reviewApp import REVIEW_KEYS

    source = (ROOT / "AnomalyFlag" / "AnomalyFlagWidgets" / "reviewSection.py").read_text()
    shortcuts = next(
        ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHORTCUTS"
    )
    slots = {"onAcceptSlice": "accept", "onRecontourSlice": "recontour", "onSkipSlice": "skip",
             "onAbnormalSlice": "abnormal"}  # fmt: skip
    assert {key.lower(): slots[slot] for key, slot in shortcuts} == REVIEW_KEYS
