"""Scoring a volume node in the background for the module panel, without Qt: one run at a time in a
BackgroundRunner made by `runnerFactory` (tests pass a fake), its events as what the panel shows, and the
result published as nodes on the main thread when the run ends; the panel polls it from a timer. Also the
panel's texts about scoring: why it cannot start, and the summary of a result."""

import traceback

from .constants import MODEL_METADATA_FILE
from .i18n import tr as _
from .runner import ThreadRunner
from .workflow import publishResult


class ScoringController:
    """The scoring run of the module panel (see module docstring)."""

    def __init__(self, runnerFactory=ThreadRunner) -> None:
        self.runnerFactory = runnerFactory
        self.runner = None
        self._publishArgs = None  # publishResult's arguments besides the result, while a run is on

    def isRunning(self) -> bool:
        """True from start() until poll() has returned the run's final event."""
        return self._publishArgs is not None

    def start(self, task, job, inputVolumeNode, segmentationNode=None, thresholdOverride=None, heatmapNode=None,
              tableNode=None, chartNode=None) -> None:  # fmt: skip
        """Run `task(progress=, log=, cancelRequested=, **job)` in a new runner. The CaseResult it returns is
        published on `inputVolumeNode` into the output nodes given (None: new ones), see
        workflow.publishResult."""
        if self.isRunning():
            raise RuntimeError("AnomalyFlag: a scoring run is already in progress.")
        runner = self.runnerFactory()
        runner.start(task, **job)
        self.runner = runner
        self._publishArgs = {"inputVolumeNode": inputVolumeNode, "segmentationNode": segmentationNode,
                             "thresholdOverride": thresholdOverride, "heatmapNode": heatmapNode,
                             "tableNode": tableNode, "chartNode": chartNode}  # fmt: skip

    def cancel(self) -> None:
        """Ask the run to stop at its next check; poll() then ends it with ("cancelled",)."""
        if self.isRunning():
            self.runner.cancel()

    def abandon(self) -> None:
        """Cancel the run and forget it: its result will not be published (after a failure of the panel)."""
        self.cancel()
        self._publishArgs = None

    def poll(self) -> list:
        """The run's events since the last poll, oldest first: ("progress", done, total) and ("log", text),
        then one that ends the run: ("done", outputs of publishResult), ("cancelled",), ("discarded",) when
        the input volume left the scene while scoring, ("error", exception, traceback text) when scoring
        failed, or ("publishError", exception, traceback text) when the result could not be published."""
        if not self.isRunning():
            return []
        stopped = not self.runner.isRunning()
        out = []
        for event in self.runner.poll():
            if event[0] in ("progress", "log"):
                out.append(tuple(event))
                continue
            args, self._publishArgs = self._publishArgs, None
            if event[0] == "done":
                out.append(self._publish(event[1], args))
            elif event[0] == "error":
                out.append(("error", event[1], event[2] if len(event) > 2 else ""))
            else:
                out.append(("cancelled",))
            return out
        if stopped:  # the worker had ended before this poll yet queued no final event (the runner guarantees one)
            self._publishArgs = None
            out.append(("error", RuntimeError(_("the background computation ended without a result.")), ""))
        return out

    @staticmethod
    def _publish(result, args):
        volume = args["inputVolumeNode"]
        if volume is None or volume.GetScene() is None:
            return ("discarded",)
        try:
            return ("done", publishResult(result, **args))
        except Exception as exc:
            return ("publishError", exc, traceback.format_exc())


def checkScoringInputs(inputVolumeNode, modelPath, demoModelPath=None, heatmapNode=None) -> tuple:
    """(problem, modelText): why scoring cannot start (None when it can) and which model it would use.
    `modelPath` is the model folder to use (None: there is none), `demoModelPath` the demo model's."""
    if modelPath is None:
        modelText, problem = _("No model selected and the demo model is not installed."), _("Choose a model folder.")
    elif not (modelPath / MODEL_METADATA_FILE).is_file():
        modelText = problem = _("'{path}' is not a model folder (it has no {file}).").format(
            path=modelPath, file=MODEL_METADATA_FILE
        )
    else:
        text = _("Demo model: {path}") if modelPath == demoModelPath else _("Model: {path}")
        modelText, problem = text.format(path=modelPath), None
    if not inputVolumeNode:
        problem = _("Select the CT volume to score.")
    elif heatmapNode is not None and heatmapNode == inputVolumeNode:
        problem = _("The heatmap volume must not be the input volume; choose another or none.")
    return problem, modelText


def resultSummary(result) -> str:
    """The status line of a result: flagged slices, time, the scan's level where its flags are relative to
    it, and whether the scan looks unlike the model's training data."""
    text = _("Done: {flagged} of {total} slices flagged ({seconds} s).").format(
        flagged=len(result.flagged_indices), total=len(result.slices), seconds=result.timings.get("total", "?")
    )
    if result.scan_level > 0:
        text += " " + _("Flags are relative to this scan, which scores {level} above normal scans throughout.").format(
            level=f"{result.scan_level:.2f}"
        )
    if result.warnings:
        text += " " + _("Warning: this scan does not look like the model's training data: {reasons}.").format(
            reasons="; ".join(result.warnings)
        )
    return text
