"""AnomalyFlag: flags CT slices on which an automatic segmentation is likely to fail.

This file is the thin Slicer layer (module description, parameter node, widget, logic and self-test).
The detector itself lives in the Slicer-independent library ``AnomalyFlagLib`` and the MRML glue in
``AnomalyFlagMRML``; both are imported only when needed, because they import torch, which may not be
installed yet when Slicer loads this module (see ``AnomalyFlagDependencies``).
"""

import importlib
import json
import logging
import os
import pathlib
import sys
import traceback
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4

    def _(text):
        return text

    def translate(context, text):
        return text


# The library and bridge packages sit next to this file (source tree and installed extension alike).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

import AnomalyFlagDependencies  # noqa: E402 - Qt-free, imports neither torch nor MONAI

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
DEMO_MODEL_NAME = "AnomalyFlagDemoChestCT"
MODEL_METADATA_FILE = "metadata.json"
POLL_INTERVAL_MS = 100


def _bridge(name: str):
    """An AnomalyFlagMRML submodule, imported on first use (it imports torch through AnomalyFlagLib)."""
    return importlib.import_module("AnomalyFlagMRML." + name)


#
# AnomalyFlag
#


class AnomalyFlag(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Flag")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AnomalyFlag contributors (https://github.com/anomalyflag/SlicerAnomalyFlag)"]
        self.parent.helpText = _(
            "Flags the CT slices on which an automatic segmentation is likely to fail. A GAN trained on "
            "normal scans restores every slice to normal anatomy and points at what it had to change; slices "
            "that differ from normal anatomy by more than a threshold calibrated on normal scans are flagged, "
            "and an anomaly heatmap shows where. Review the flagged slices next to the segmentation outlines "
            "and accept or recontour them. See the "
            '<a href="https://github.com/anomalyflag/SlicerAnomalyFlag#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "AnomalyFlag uses PyTorch, MONAI, SimpleITK and safetensors. Its detectors follow denoising "
            "restoration (Kascenas et al., MIDL 2022), DRAEM (Zavrtanik et al., ICCV 2021) and f-AnoGAN "
            "(Schlegl et al., Medical Image Analysis 2019). It is a research tool, not a medical device."
        )


#
# AnomalyFlagParameterNode
#


@parameterNodeWrapper
class AnomalyFlagParameterNode:
    """Everything the user chooses in the module panel; saved with the scene.

    inputVolume: the CT volume whose slices are scored.
    segmentation, segmentId: optional reference segmentation; the segment limits flags to its slices.
    modelPath: model bundle folder; empty means the demo model that ships with the extension.
    device: "auto" (CUDA > MPS > CPU), "cpu", "cuda" or "mps".
    thresholdOverride: normalised-score threshold; 0 uses the model's calibrated threshold.
    batchSize: slices per batch; 0 chooses one from the device.
    heatmapVolume, scoreTable, scoreChart: outputs (created when not set).
    reviewer: the reviewer's name, recorded with every review decision.
    worklistFolder: folder with worklist.csv and the scored cases to review.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    modelPath: pathlib.Path
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    thresholdOverride: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0
    heatmapVolume: vtkMRMLScalarVolumeNode
    scoreTable: vtkMRMLTableNode
    scoreChart: vtkMRMLPlotChartNode
    reviewer: str = ""
    worklistFolder: pathlib.Path


def _isUnset(path) -> bool:
    return path is None or str(path).strip() in ("", ".")


#
# AnomalyFlagWidget
#


class AnomalyFlagWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: binds the GUI to the parameter node, runs the scoring off the GUI thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None
        self._runInputs = None
        self._pollTimer = None
        self._updatingSegmentSelector = False
        self._shortcuts = []
        self._recontourSlice = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyFlag.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnomalyFlagLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The segment selector has no parameter node connector: it follows the segmentation selector and
        # writes the chosen segment ID into the parameter node by hand.
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)

        self.ui.useDemoModelButton.connect("clicked(bool)", self.onUseDemoModel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.flaggedSlicesListWidget.connect("currentRowChanged(int)", self.onFlaggedSliceSelected)
        self.ui.previousFlaggedButton.connect("clicked(bool)", self.onPreviousFlagged)
        self.ui.nextFlaggedButton.connect("clicked(bool)", self.onNextFlagged)

        self.ui.loadWorklistButton.connect("clicked(bool)", self.onLoadWorklist)
        self.ui.previousCaseButton.connect("clicked(bool)", self.onPreviousCase)
        self.ui.nextCaseButton.connect("clicked(bool)", self.onNextCase)
        self.ui.reviewSlicesListWidget.connect("currentRowChanged(int)", self.onReviewSliceSelected)
        self.ui.acceptSliceButton.connect("clicked(bool)", self.onAcceptSlice)
        self.ui.recontourSliceButton.connect("clicked(bool)", self.onRecontourSlice)
        self.ui.skipSliceButton.connect("clicked(bool)", self.onSkipSlice)
        self.ui.finishRecontourButton.connect("clicked(bool)", self.onFinishRecontour)
        self.ui.undoDecisionButton.connect("clicked(bool)", self.onUndoDecision)
        # Keyboard shortcuts of the review; active while this panel is shown (a line edit with focus
        # keeps its letters).
        for key, slot in (("A", self.onAcceptSlice), ("R", self.onRecontourSlice), ("S", self.onSkipSlice)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), self.parent)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False
        self._updateFlaggedNavigation()
        self._updateReviewGui()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollRunner)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._runner is not None and self._runner.isRunning():
            self._runner.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        if self.logic is not None:
            self.logic.closeReview()  # releases the case's review lock; decisions are already saved
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._runner is not None and self._runner.isRunning():
            self._runner.cancel()
        self.setParameterNode(None)
        self._clearFlaggedList()
        self.logic.unloadCase()
        self.logic.decisionsTableNode = None
        self._recontourSlice = None
        self._updateReviewGui()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the first volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            # Not a heatmap of an earlier run (AnomalyFlagMRML.heatmap marks those; not imported here
            # because the bridge needs torch, which may not be installed yet).
            if firstVolumeNode and firstVolumeNode.GetAttribute("AnomalyFlag.Role") != "heatmap":
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[AnomalyFlagParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._updateSegmentSelectorFromParameterNode()
        self._checkCanApply()

    # ------------------------------------------------------------------ GUI state

    def _isRunning(self) -> bool:
        return self._runner is not None and self._runner.isRunning()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable Apply only when the inputs are valid; say why not in the tooltip."""
        if not hasattr(self, "ui"):
            return
        p = self._parameterNode
        reason = None
        modelText = ""
        if p is None:
            reason = _("The module is not initialised.")
        else:
            modelPath = self.logic.resolveModelPath(p.modelPath, required=False)
            if modelPath is None:
                modelText = _("No model selected and the demo model is not installed.")
                reason = _("Choose a model folder.")
            elif not (modelPath / MODEL_METADATA_FILE).is_file():
                modelText = _("'{path}' is not a model folder (it has no {file}).").format(
                    path=modelPath, file=MODEL_METADATA_FILE
                )
                reason = modelText
            else:
                demo = self.logic.defaultModelPath()
                modelText = (
                    _("Demo model: {path}") if demo is not None and modelPath == demo else _("Model: {path}")
                ).format(path=modelPath)
            if not p.inputVolume:
                reason = _("Select the CT volume to score.")
            elif p.heatmapVolume is not None and p.heatmapVolume == p.inputVolume:
                reason = _("The heatmap volume must not be the input volume; choose another or none.")
        if self._isRunning():
            reason = _("Scoring is running.")
        self.ui.modelInfoLabel.text = modelText
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Score every slice of the input volume.")

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.setVisible(running)
        for section in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                        self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton):  # fmt: skip
            section.enabled = not running
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
            self.ui.progressBar.value = 0
        self._checkCanApply()

    def _log(self, text: str) -> None:
        logging.info("AnomalyFlag: %s", text)
        self.ui.logTextEdit.appendPlainText(text)

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        self._log(text)

    # ------------------------------------------------------------------ segment selection

    def _updateSegmentSelectorFromParameterNode(self) -> None:
        p = self._parameterNode
        self._updatingSegmentSelector = True
        try:
            self.ui.segmentSelector.setCurrentNode(p.segmentation if p else None)
            if p and p.segmentation and p.segmentId:
                self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        finally:
            self._updatingSegmentSelector = False

    def onSegmentationChanged(self, node) -> None:
        """Point the segment selector at the new segmentation. The stored segment is kept when the new
        segmentation has it; otherwise no segment is selected (outlines only, the whole scan is scored)."""
        p = self._parameterNode
        keep = bool(p and node and p.segmentId and node.GetSegmentation().GetSegment(p.segmentId))
        self._updatingSegmentSelector = True
        try:
            self.ui.segmentSelector.setCurrentNode(node)
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId if keep else "")
        finally:
            self._updatingSegmentSelector = False
        if p and not keep and p.segmentId:
            p.segmentId = ""

    def onSegmentChanged(self, segmentId) -> None:
        if self._updatingSegmentSelector or not self._parameterNode:
            return
        self._parameterNode.segmentId = segmentId or ""

    # ------------------------------------------------------------------ buttons

    def onUseDemoModel(self) -> None:
        demo = self.logic.defaultModelPath()
        if demo is None:
            slicer.util.errorDisplay(
                _("The demo model is not installed. Looked in:\n{paths}").format(
                    paths="\n".join(str(p) for p in self.logic.demoModelCandidates())
                )
            )
            return
        self._parameterNode.modelPath = demo

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing the AnomalyFlag dependencies failed."), waitCursor=True):
            missing = AnomalyFlagDependencies.missingDependencies()
            if not missing:
                slicer.util.infoDisplay(_("PyTorch, MONAI and safetensors are installed."))
                return
            if AnomalyFlagDependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                self._log(_("Installed: {packages}").format(packages=", ".join(missing)))

    def _ensureDependencies(self) -> bool:
        """True when torch, MONAI and safetensors can be imported; asks to install them when not."""
        missing = AnomalyFlagDependencies.missingDependencies()
        if not missing:
            return True
        if not AnomalyFlagDependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay):
            self._setStatus(_("Not started: {packages} must be installed first.").format(packages=", ".join(missing)))
            return False
        return True

    def onApplyButton(self) -> None:
        """Read the inputs on the main thread, then score in a worker thread polled by a timer."""
        if self._isRunning():
            return
        self.ui.logTextEdit.clear()
        self._clearFlaggedList()
        with slicer.util.tryWithErrorDisplay(_("Anomaly scoring could not start."), waitCursor=True):
            if not self._ensureDependencies():
                return
            p = self._parameterNode
            job = self.logic.prepareScoring(
                p.inputVolume,
                modelPath=p.modelPath,
                segmentationNode=p.segmentation,
                segmentId=p.segmentId or None,
                device=p.device,
                batchSize=p.batchSize or None,
            )
            self._runInputs = {
                "inputVolume": p.inputVolume,
                "segmentation": p.segmentation,
                "thresholdOverride": p.thresholdOverride or None,
            }
            self._runner = _bridge("runner").ThreadRunner()
            self._setStatus(
                _("Scoring '{volume}' with model {model} ...").format(
                    volume=p.inputVolume.GetName(), model=job["modelPath"]
                )
            )
            self._runner.start(_computeScoresTask, **job)
            self._setRunning(True)
            self._pollTimer.start()

    def onCancelButton(self) -> None:
        if self._isRunning():
            self._runner.cancel()
            self.ui.cancelButton.enabled = False
            self._setStatus(_("Cancelling ..."))

    def onPollRunner(self) -> None:
        """Handle the events the worker thread queued since the last tick (runs on the GUI thread)."""
        if self._runner is None:
            self._pollTimer.stop()
            return
        try:
            stopped = not self._runner.isRunning()
            for event in self._runner.poll():
                self._handleRunnerEvent(event)
        except Exception as exc:  # a bug here must not leave the timer firing forever
            self._finishRun()
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(_("Anomaly scoring failed: {error}").format(error=exc))
            return
        if stopped and self._runInputs is not None:
            # The worker had ended before this poll yet queued no final event (the runner guarantees one).
            self._finishRun()
            self._showRunError(RuntimeError(_("the background computation ended without a result.")), "")

    def _handleRunnerEvent(self, event) -> None:
        kind = event[0]
        if kind == "progress":
            done, total = int(event[1]), int(event[2])
            self.ui.progressBar.setRange(0, max(total, 1))
            self.ui.progressBar.value = done
            self.ui.statusLabel.text = _("Scored {done} of {total} slices").format(done=done, total=total)
        elif kind == "log":
            self._log(str(event[1]))
        elif kind == "done":
            inputs = self._runInputs
            self._finishRun()
            self._publish(event[1], inputs)
        elif kind == "error":
            exc, tb = event[1], event[2] if len(event) > 2 else ""
            self._finishRun()
            self._showRunError(exc, tb)
        elif kind == "cancelled":
            self._finishRun()
            self._setStatus(_("Scoring cancelled; nothing was changed in the scene."))

    def _finishRun(self) -> None:
        self._pollTimer.stop()
        self._runInputs = None
        self._setRunning(False)

    def _showRunError(self, exc, tb) -> None:
        self._setStatus(_("Scoring failed."))
        if tb:
            logging.error("AnomalyFlag scoring failed:\n%s", tb)
            self.ui.logTextEdit.appendPlainText(str(tb))
        errors = importlib.import_module("AnomalyFlagLib.errors")
        if isinstance(exc, errors.AnomalyFlagError):
            slicer.util.errorDisplay(_("Anomaly scoring failed:\n{error}").format(error=exc))
        else:
            slicer.util.errorDisplay(
                _("Anomaly scoring failed ({kind}): {error}").format(kind=type(exc).__name__, error=exc),
                detailedText=str(tb),
            )

    def _publish(self, result, inputs) -> None:
        """Create or update the output nodes on the main thread and fill the flagged-slice list."""
        volume = inputs["inputVolume"] if inputs else None
        if self._parameterNode is None or volume is None or volume.GetScene() is None:
            self._setStatus(_("The scene was closed or the input volume removed while scoring; result discarded."))
            return
        with slicer.util.tryWithErrorDisplay(
            _("Scoring finished but the results could not be shown."), waitCursor=True
        ):
            p = self._parameterNode
            outputs = self.logic.publishResult(
                result,
                inputs["inputVolume"],
                segmentationNode=inputs["segmentation"],
                thresholdOverride=inputs["thresholdOverride"],
                heatmapNode=p.heatmapVolume,
                tableNode=p.scoreTable,
                chartNode=p.scoreChart,
            )
            p.heatmapVolume = outputs["heatmap"]
            p.scoreTable = outputs["table"]
            p.scoreChart = outputs["chart"]
            result = outputs["result"]
            self._showChart(outputs["chart"])
            flagged = self._populateFlaggedList(outputs["table"], result)
            status = _("Done: {flagged} of {total} slices flagged ({seconds} s).").format(
                flagged=len(flagged),
                total=len(result.slices),
                seconds=result.timings.get("total", "?"),
            )
            if result.warnings:
                logging.warning("AnomalyFlag: %s", result.warning_text())
                status += " " + _("Warning: this scan does not look like the model's training data: {reasons}.").format(
                    reasons="; ".join(result.warnings)
                )
            self._setStatus(status)

    @staticmethod
    def _showChart(chartNode) -> None:
        if chartNode is None:
            return
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        except Exception as exc:  # the Plots module may be disabled; the chart is in the scene anyway
            logging.warning("AnomalyFlag: cannot show the score chart: %s", exc)

    # ------------------------------------------------------------------ flagged slices

    def _clearFlaggedList(self) -> None:
        self.ui.flaggedSlicesListWidget.clear()
        self.ui.flaggedSummaryLabel.text = _("No results yet.")
        self._updateFlaggedNavigation()

    def _populateFlaggedList(self, tableNode, result=None) -> list:
        """List the flagged slices of the table (with their normalised score when `result` is given)."""
        flagged = self.logic.flaggedSlices(tableNode)
        scores = result.slices["normalised"] if result is not None else None
        listWidget = self.ui.flaggedSlicesListWidget
        listWidget.blockSignals(True)
        listWidget.clear()
        for sliceIndex in flagged:
            text = _("Slice {index}").format(index=sliceIndex)
            if scores is not None and 0 <= sliceIndex < len(scores):
                text += "    " + _("score {score}").format(score=f"{float(scores[sliceIndex]):.2f}")
            item = qt.QListWidgetItem(text)
            item.setData(qt.Qt.UserRole, int(sliceIndex))
            listWidget.addItem(item)
        listWidget.blockSignals(False)
        if flagged:
            self.ui.flaggedSummaryLabel.text = _(
                "{count} flagged slice(s). Select one to show it; scores are normalised (threshold {threshold})."
            ).format(count=len(flagged), threshold=self._thresholdText(tableNode))
        else:
            self.ui.flaggedSummaryLabel.text = _("No slice is over the threshold.")
        self._updateFlaggedNavigation()
        return flagged

    def _updateFlaggedNavigation(self) -> None:
        count = self.ui.flaggedSlicesListWidget.count
        row = self.ui.flaggedSlicesListWidget.currentRow
        self.ui.previousFlaggedButton.enabled = count > 0 and row > 0
        self.ui.nextFlaggedButton.enabled = count > 0 and row < count - 1

    @staticmethod
    def _thresholdText(tableNode) -> str:
        threshold = _bridge("scoreTable").tableThreshold(tableNode)
        return "?" if threshold is None else f"{threshold:.2f}"

    def onFlaggedSliceSelected(self, row: int) -> None:
        self._updateFlaggedNavigation()
        item = self.ui.flaggedSlicesListWidget.item(row) if row >= 0 else None
        if item is None or not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot show the flagged slice.")):
            self.logic.jumpToFlaggedSlice(
                self._parameterNode.inputVolume, self._parameterNode.heatmapVolume, int(item.data(qt.Qt.UserRole))
            )

    def onPreviousFlagged(self) -> None:
        listWidget = self.ui.flaggedSlicesListWidget
        if listWidget.currentRow > 0:
            listWidget.setCurrentRow(listWidget.currentRow - 1)

    def onNextFlagged(self) -> None:
        listWidget = self.ui.flaggedSlicesListWidget
        if listWidget.currentRow < listWidget.count - 1:
            listWidget.setCurrentRow(listWidget.currentRow + 1)

    # ------------------------------------------------------------------ review loop

    def _updateReviewGui(self) -> None:
        """Case label, progress, the flagged-slice list with scores and decisions, button states."""
        logic = self.logic
        session = logic.reviewSession
        rows = logic.worklistRows
        index = logic.worklistIndex
        caseName = logic.reviewCase.get("case") or (rows[index]["case"] if 0 <= index < len(rows) else "")
        if caseName:
            self.ui.reviewCaseLabel.text = _("{case} ({index} of {count})").format(
                case=caseName, index=index + 1, count=len(rows)
            )
        else:
            self.ui.reviewCaseLabel.text = _("No case loaded.")
        self.ui.reviewProgressLabel.text = logic.reviewProgressText()
        self.ui.previousCaseButton.enabled = index > 0
        self.ui.nextCaseButton.enabled = 0 <= index < len(rows) - 1
        listWidget = self.ui.reviewSlicesListWidget
        selected = self._selectedReviewSlice()
        listWidget.blockSignals(True)
        listWidget.clear()
        decisionText = {"accepted": _("accepted"), "recontoured": _("recontoured"), "skipped": _("skipped")}
        queue = logic.reviewQueue() if session is not None else []
        for item in queue:
            score = item["score"]
            text = _("Slice {index}    score {score}    {decision}").format(
                index=item["slice"],
                score="?" if score is None else f"{float(score):.2f}",
                decision=decisionText.get(item["decision"], _("pending")),
            )
            change = item.get("change")
            if change:
                text += "    " + _("Dice {dice}, {voxels} voxels changed").format(
                    dice=f"{change['dice']:.3f}", voxels=change["changed_voxels"]
                )
            listItem = qt.QListWidgetItem(text)
            listItem.setData(qt.Qt.UserRole, int(item["slice"]))
            listWidget.addItem(listItem)
            if item["slice"] == selected:
                listWidget.setCurrentItem(listItem)
        listWidget.blockSignals(False)
        hasSlice = session is not None and self._selectedReviewSlice() is not None
        self.ui.acceptSliceButton.enabled = hasSlice
        self.ui.skipSliceButton.enabled = hasSlice
        self.ui.recontourSliceButton.enabled = hasSlice and bool(logic.reviewCase.get("segmentation"))
        self.ui.finishRecontourButton.enabled = session is not None and bool(logic.recontouringSlices())
        self.ui.undoDecisionButton.enabled = session is not None and bool(session.history)
        self.ui.decisionsTableView.setMRMLTableNode(logic.decisionsTableNode)

    def _selectedReviewSlice(self):
        item = self.ui.reviewSlicesListWidget.currentItem()
        return None if item is None else int(item.data(qt.Qt.UserRole))

    def _selectReviewSlice(self, sliceIndex) -> None:
        """Select a slice in the review list (which jumps the views there)."""
        listWidget = self.ui.reviewSlicesListWidget
        for row in range(listWidget.count):
            if int(listWidget.item(row).data(qt.Qt.UserRole)) == sliceIndex:
                listWidget.setCurrentRow(row)
                return

    def _selectNextPending(self) -> None:
        if self.logic.reviewSession is None:
            return
        nextSlice = self.logic.nextPendingSlice()
        if nextSlice is not None:
            self._selectReviewSlice(nextSlice)
        else:
            self._setStatus(_("All flagged slices of this case are reviewed."))

    def _selectedSegmentName(self) -> str:
        p = self._parameterNode
        if p and p.segmentation and p.segmentId:
            segment = p.segmentation.GetSegmentation().GetSegment(p.segmentId)
            return segment.GetName() if segment is not None else ""
        return ""

    def _afterCaseChange(self, case) -> None:
        """Show the loaded case's nodes in the Inputs section and select its first pending slice."""
        self._recontourSlice = None
        p = self._parameterNode
        if case and p is not None:
            p.inputVolume = case["volume"]
            p.heatmapVolume = case["heatmap"]
            p.segmentation = case["segmentation"]
        self._updateReviewGui()
        if self.logic.reviewSession is None and case:
            self._setStatus(_("Case {case} loaded; enter the reviewer name and press Load to review it.").format(
                case=case["case"]))  # fmt: skip
        self._selectNextPending()

    def onLoadWorklist(self) -> None:
        p = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("The worklist could not be loaded."), waitCursor=True):
                if _isUnset(p.worklistFolder):
                    raise ValueError(_("Choose the worklist folder first."))
                folder = pathlib.Path(str(p.worklistFolder))
                sameFolder = self.logic.worklistFolder == folder
                index = max(self.logic.worklistIndex, 0) if sameFolder else 0
                case = self.logic.loadWorklist(folder, reviewer=p.reviewer, index=index,
                                               segmentName=self._selectedSegmentName() or None)  # fmt: skip
                self._afterCaseChange(case)
        finally:
            self._updateReviewGui()

    def _changeCase(self, step) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("The case could not be loaded."), waitCursor=True):
                self.logic.reviewer = (self._parameterNode.reviewer or "").strip()
                case = self.logic.nextCase() if step > 0 else self.logic.previousCase()
                self._afterCaseChange(case)
        finally:
            self._updateReviewGui()

    def onPreviousCase(self) -> None:
        self._changeCase(-1)

    def onNextCase(self) -> None:
        self._changeCase(+1)

    def onReviewSliceSelected(self, row: int) -> None:
        self._updateReviewGui()
        sliceIndex = self._selectedReviewSlice()
        if sliceIndex is None or self.logic.reviewSession is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot show the flagged slice.")):
            self.logic.jumpToReviewSlice(sliceIndex)

    def _decideSelected(self, method) -> None:
        sliceIndex = self._selectedReviewSlice()
        if sliceIndex is None or self.logic.reviewSession is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The decision was not saved."), waitCursor=True):
            method(sliceIndex, note=self.ui.reviewNoteLineEdit.text)
            self.ui.reviewNoteLineEdit.text = ""
            self._updateReviewGui()
            self._selectNextPending()

    def onAcceptSlice(self) -> None:
        self._decideSelected(self.logic.acceptSlice)

    def onSkipSlice(self) -> None:
        self._decideSelected(self.logic.skipSlice)

    def onUndoDecision(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The decision could not be withdrawn.")):
            removed = self.logic.undoLastDecision()
            self._updateReviewGui()
            if removed:
                self._selectReviewSlice(int(removed["slice"]))

    def onRecontourSlice(self) -> None:
        """Open Slicer's Segment Editor on the selected flagged slice with the segment selected."""
        sliceIndex = self._selectedReviewSlice()
        if sliceIndex is None or self.logic.reviewSession is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start recontouring."), waitCursor=True):
            target = self.logic.startRecontour(sliceIndex)
            self._recontourSlice = sliceIndex
            self._openSegmentEditor(target)
            message = _(
                "Recontouring slice {index} (segment '{segment}'): edit it in the Segment Editor, then come back "
                "and press 'Finish recontour / Save version'."
            )
            self._setStatus(message.format(index=sliceIndex, segment=target["segmentName"]))
            self._updateReviewGui()

    def _openSegmentEditor(self, target) -> None:
        """App only: switch to the Segment Editor with the target's segmentation, source volume and segment
        selected (prepared by AnomalyFlagMRML.review.prepareSegmentEditorNode), and jump to the slice."""
        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        _bridge("review").prepareSegmentEditorNode(target, editorWidget.mrmlSegmentEditorNode())
        segmentationNode = slicer.mrmlScene.GetNodeByID(target["segmentationNodeID"])
        volumeNode = slicer.mrmlScene.GetNodeByID(target["sourceVolumeNodeID"])
        editorWidget.setSegmentationNode(segmentationNode)
        if hasattr(editorWidget, "setSourceVolumeNode"):
            editorWidget.setSourceVolumeNode(volumeNode)
        else:  # Slicer before 5.4
            editorWidget.setMasterVolumeNode(volumeNode)
        editorWidget.setCurrentSegmentID(target["segmentID"])
        self.logic.jumpToReviewSlice(target["sliceIndex"])

    def onFinishRecontour(self) -> None:
        slices = self.logic.recontouringSlices()
        if self.logic.reviewSession is None or not slices:
            return
        sliceIndex = self._recontourSlice if self._recontourSlice in slices else slices[0]
        with slicer.util.tryWithErrorDisplay(_("The edited segmentation was not saved."), waitCursor=True):
            try:  # let an active effect (e.g. a pending paint stroke) finish before the segmentation is read
                slicer.modules.segmenteditor.widgetRepresentation().self().editor.setActiveEffect(None)
            except AttributeError:
                pass
            record = self.logic.finishRecontour(sliceIndex, note=self.ui.reviewNoteLineEdit.text)
            self.ui.reviewNoteLineEdit.text = ""
            self._recontourSlice = None
            change = record["change"]
            self._setStatus(
                _("Slice {index} recontoured: Dice {dice}, {voxels} voxels changed; saved as {file}.").format(
                    index=sliceIndex, dice=f"{change['dice']:.3f}", voxels=change["changed_voxels"],
                    file=record["label"])
            )  # fmt: skip
            self._updateReviewGui()
            self._selectNextPending()


def _computeScoresTask(progress, log, cancelRequested, **job):
    """Worker-thread body: scores arrays only (no MRML, no Qt)."""
    return AnomalyFlagLogic.computeScores(progress=progress, log=log, cancel=cancelRequested, **job)


#
# AnomalyFlagLogic
#


class AnomalyFlagLogic(ScriptedLoadableModuleLogic):
    """Scoring without the GUI; usable from Slicer's Python console.

    Example::

        logic = slicer.util.getModuleLogic("AnomalyFlag")
        outputs = logic.scoreVolume(slicer.util.getNode("CT"), device="cpu")
        print(logic.flaggedSlices(outputs["table"]))
        logic.jumpToFlaggedSlice(slicer.util.getNode("CT"), outputs["heatmap"], 12)

    Heavy packages (torch, MONAI) are imported on the first scoring call, after checking that they are
    installed; ``AnomalyFlagDependencies.installDependencies()`` installs them (it asks first).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._review = None  # the open review: session, case, nodes, pending recontours
        self._worklist = None  # {"folder", "rows", "index"}
        self._loadedCase = None  # what loadReviewCase put into the scene for the current worklist case
        self.reviewer = ""
        self.decisionsTableNode = None
        self.preferredSegmentName = ""

    def getParameterNode(self) -> AnomalyFlagParameterNode:
        return AnomalyFlagParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ model location

    @staticmethod
    def demoModelCandidates() -> list:
        """Where the demo model bundle may be, in order of preference.

        1. ``<module dir>/Resources/Models/AnomalyFlagDemoChestCT``: the build tree and the installed
           extension. AnomalyFlag/CMakeLists.txt copies the bundle from the repository's top-level
           ``Resources/Models`` into the module's Resources folder and installs it there.
        2. ``<module dir>/../Resources/Models/AnomalyFlagDemoChestCT``: the source tree, when Slicer loads
           AnomalyFlag.py straight from a checkout (Additional module paths = <repo>/AnomalyFlag).
        """
        moduleDir = pathlib.Path(_MODULE_DIR)
        return [
            moduleDir / "Resources" / "Models" / DEMO_MODEL_NAME,
            moduleDir.parent / "Resources" / "Models" / DEMO_MODEL_NAME,
        ]

    def defaultModelPath(self) -> Optional[pathlib.Path]:
        """Folder of the demo model bundle that ships with the extension, or None when it is absent."""
        for candidate in self.demoModelCandidates():
            if (candidate / MODEL_METADATA_FILE).is_file():
                return candidate
        return None

    def resolveModelPath(self, modelPath=None, required: bool = True) -> Optional[pathlib.Path]:
        """`modelPath` as a Path, or the demo model when it is empty.

        With `required`, raises ValueError naming the folders searched when no model can be found.
        """
        if not _isUnset(modelPath):
            return pathlib.Path(str(modelPath)).expanduser()
        demo = self.defaultModelPath()
        if demo is None and required:
            raise ValueError(
                _("No model folder is selected and the demo model is not installed (looked in {paths}).").format(
                    paths=", ".join(str(p) for p in self.demoModelCandidates())
                )
            )
        return demo

    # ------------------------------------------------------------------ dependencies

    @staticmethod
    def requireDependencies() -> None:
        """Raise a clear error when torch, MONAI or safetensors is missing (nothing is installed here)."""
        missing = AnomalyFlagDependencies.missingDependencies()
        if missing:
            raise AnomalyFlagDependencies.DependencyInstallError(
                _(
                    "AnomalyFlag needs {packages}. Press Apply in the module panel to install them, or run "
                    "AnomalyFlagDependencies.installDependencies() in the Python console."
                ).format(packages=", ".join(missing))
            )

    # ------------------------------------------------------------------ scoring in three steps

    def prepareScoring(self, inputVolumeNode, modelPath=None, segmentationNode=None, segmentId=None,
                       device="auto", batchSize=None, roiMarginMm=10.0) -> dict:  # fmt: skip
        """Main thread: read the voxels, geometry and optional ROI mask out of MRML.

        Returns the keyword arguments of :meth:`computeScores` (plain arrays, no MRML objects), so that
        the scoring itself can run in a worker thread.
        """
        self.requireDependencies()
        if inputVolumeNode is None:
            raise ValueError(_("No input volume is selected."))
        resolved = self.resolveModelPath(modelPath)  # the bundle and the device are checked when loading
        array, geometry = _bridge("volumes").arrayAndGeometryFromVolumeNode(inputVolumeNode)
        roiMask = None
        if segmentationNode is not None and segmentId:
            roiMask = _bridge("segmentation").roiMaskFromSegmentation(segmentationNode, [segmentId], inputVolumeNode)
        return {
            "array": array,
            "geometry": geometry,
            "modelPath": resolved,
            "roiMask": roiMask,
            "device": device or "auto",
            "batchSize": batchSize or None,
            "roiMarginMm": roiMarginMm,
            "name": inputVolumeNode.GetName(),
        }

    @staticmethod
    def computeScores(array, geometry, modelPath, roiMask=None, device="auto", batchSize=None, roiMarginMm=10.0,
                      name="volume", progress=None, log=None, cancel=None):  # fmt: skip
        """Any thread: score the slices of an array (no MRML access). Returns a CaseResult."""
        if log is not None:
            log(_("Loading model {path} on device '{device}' ...").format(path=modelPath, device=device))
        return _bridge("workflow").computeScores(
            array,
            geometry,
            modelPath,
            roiMask=roiMask,
            device=device,
            batchSize=batchSize,
            roiMarginMm=roiMarginMm,
            name=name,
            progress=progress,
            cancel=cancel,
        )

    def publishResult(self, result, inputVolumeNode, segmentationNode=None, thresholdOverride=None,
                      heatmapNode=None, tableNode=None, chartNode=None) -> dict:  # fmt: skip
        """Main thread: write a CaseResult into heatmap, table and chart nodes (created when None) and show
        the heatmap over the input with the segmentation outlines. A threshold override re-flags slices.

        Returns dict(heatmap=, table=, chart=, result=) where result carries the threshold used.
        """
        return _bridge("workflow").publishResult(
            result,
            inputVolumeNode,
            segmentationNode=segmentationNode,
            thresholdOverride=thresholdOverride,
            heatmapNode=heatmapNode,
            tableNode=tableNode,
            chartNode=chartNode,
        )

    # ------------------------------------------------------------------ console API

    def scoreVolume(self, inputVolumeNode, modelPath=None, segmentationNode=None, segmentId=None, device="auto",
                    batchSize=None, thresholdOverride=None, heatmapNode=None, tableNode=None, chartNode=None,
                    progress=None) -> dict:  # fmt: skip
        """Score every slice of a volume node and create (or update) the output nodes. Blocks until done.

        :param inputVolumeNode: scalar volume node (a CT).
        :param modelPath: model bundle folder; None uses the demo model.
        :param segmentationNode, segmentId: optional reference segment that limits flags to its slices.
        :param device: "auto", "cpu", "cuda" (or "cuda:N") or "mps"; a GPU that is absent is an error.
        :param batchSize: slices per batch; None chooses from the device.
        :param thresholdOverride: normalised-score threshold; None uses the model's calibrated threshold.
        :param heatmapNode, tableNode, chartNode: output nodes to overwrite; None creates new ones.
        :param progress: optional callable(done, total).
        :returns: dict(heatmap=volume node, table=table node, chart=plot chart node, result=CaseResult).
        """
        job = self.prepareScoring(inputVolumeNode, modelPath, segmentationNode, segmentId, device, batchSize)
        result = self.computeScores(progress=progress, log=logging.info, **job)
        return self.publishResult(result, inputVolumeNode, segmentationNode, thresholdOverride, heatmapNode,
                                  tableNode, chartNode)  # fmt: skip

    def scoreFolder(self, inputFolder, outputFolder, modelPath=None, device="auto", batchSize=None, snapshots=True,
                    progress=None, cancel=None, **options):  # fmt: skip
        """Score every volume in `inputFolder`; write per-case slice tables (CSV), heatmaps (NRRD) and
        summaries (JSON) to `outputFolder`, plus a PNG of each flagged slice when `snapshots`.

        `options` go to ``AnomalyFlagMRML.workflow.scoreFolder`` (roiFolder, roiLabels, roiMarginMm,
        snapshotSize, log). Returns one summary dict per case (with "error" for a case that failed).
        """
        self.requireDependencies()
        return _bridge("workflow").scoreFolder(
            self.resolveModelPath(modelPath),
            inputFolder,
            outputFolder,
            device=device,
            batchSize=batchSize,
            snapshots=snapshots,
            progress=progress,
            cancel=cancel,
            **options,
        )

    # ------------------------------------------------------------------ review

    @staticmethod
    def flaggedSlices(tableNode) -> list:
        """Slice indices flagged in an AnomalyFlag score table, in slice order."""
        if tableNode is None:
            return []
        return [int(i) for i in _bridge("scoreTable").flaggedSlicesFromTable(tableNode)]

    def jumpToFlaggedSlice(self, volumeNode, heatmapNode, sliceIndex, sliceNodes=None):
        """Centre the slice views on voxel slice `sliceIndex` of `volumeNode` with the heatmap shown."""
        if volumeNode is None:
            raise ValueError(_("No volume to navigate in."))
        return _bridge("navigation").jumpToSlice(volumeNode, heatmapNode, int(sliceIndex), sliceNodes=sliceNodes)

    # ------------------------------------------------------------------ review loop (console API)
    #
    # One case at a time: openReview() starts or resumes the review session of a scored case (the
    # sidecar <case>_review.json next to its outputs, see AnomalyFlagLib.review.session); acceptSlice(),
    # skipSlice() and startRecontour()/finishRecontour() record decisions, each saved to the sidecar
    # before returning and mirrored in the decisions table node. loadWorklist()/nextCase()/
    # previousCase() walk a worklist folder (worklist.csv from `anomalyflag worklist`). Errors are the
    # library's SessionError/InputError; after an error nothing already recorded has changed.
    #
    # Example::
    #
    #     logic = slicer.util.getModuleLogic("AnomalyFlag")
    #     case = logic.loadWorklist("/data/scores", reviewer="Dr Ann")  # loads and opens the top case
    #     for item in logic.reviewQueue():
    #         print(item["slice"], item["score"], item["decision"])
    #     logic.acceptSlice(12)
    #     target = logic.startRecontour(14)  # then edit the segment in the Segment Editor
    #     logic.finishRecontour(14, note="liver dome")  # saves <case>_seg_v1.seg.nrrd
    #     print(logic.reviewProgressText())
    #     logic.nextCase()

    @staticmethod
    def _errors():
        return importlib.import_module("AnomalyFlagLib.errors")

    def _requireReview(self):
        if self._review is None or self._review["session"].closed:
            raise self._errors().SessionError(_("No review is open; open a case first."))
        return self._review

    @property
    def reviewSession(self):
        """The open ReviewSession (AnomalyFlagLib.review.session), or None."""
        return self._review["session"] if self._review is not None else None

    @property
    def reviewCase(self) -> dict:
        """The case under review: dict(case, outputFolder, volume, heatmap, segmentation, segmentId), or {}."""
        if self._review is None:
            return {}
        return {k: self._review[k] for k in ("case", "outputFolder", "volume", "heatmap", "segmentation", "segmentId")}

    def _chooseSegmentId(self, segmentationNode, segmentId):
        """The segment to recontour: `segmentId` (ID or name), else the segment named like the one reviewed
        before, else the only or the first segment."""
        if segmentationNode is None:
            return None
        segmentationBridge = _bridge("segmentation")
        if segmentId:
            return segmentationBridge.requireSegmentId(segmentationNode, segmentId)
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise self._errors().InputError(
                _("Segmentation '{name}' has no segments to review.").format(name=segmentationNode.GetName())
            )
        preferred = None
        if self.preferredSegmentName:
            preferred = segmentationBridge.findSegmentId(segmentationNode, self.preferredSegmentName)
        return preferred or segmentation.GetNthSegmentID(0)

    def openReview(self, outputFolder, case, reviewer, volumeNode=None, segmentationNode=None, segmentId=None,
                   order="auto"):  # fmt: skip
        """Start or resume the review of `case` from its scoring outputs in `outputFolder`.

        :param reviewer: the reviewer's name (recorded with every decision).
        :param volumeNode: the case's image in the scene; None uses the case loaded from the worklist (or
            reviews without an image: decisions only, no recontouring). It must be on the scored grid; its
            voxels are fingerprinted so that a sidecar written for another image is refused.
        :param segmentationNode, segmentId: the automatic segmentation and the segment to recontour (ID or
            name; None: the segment reviewed before, else the first). Its labelmaps must lie on the
            volume's voxel grid.
        :param order: "auto", "normalised" or "roi" (see AnomalyFlagLib.review.session.ReviewSession.open).
        :returns: the ReviewSession; the decisions table node (``decisionsTableNode``) follows it.

        Raises SessionError/InputError (missing outputs, a sidecar from another model or image, a damaged
        sidecar, a locked case, an unwritable folder, a volume or segmentation that does not match); the
        sidecar is then left unchanged and the previously open review stays closed.
        """
        from AnomalyFlagLib.geometry import Geometry
        from AnomalyFlagLib.review.session import ReviewSession, read_case_outputs

        errors = self._errors()
        outputFolder = pathlib.Path(str(outputFolder))
        case = str(case)
        reviewer = str(reviewer or "").strip()
        if not reviewer:
            raise errors.InputError(_("Enter the reviewer's name before opening a review."))
        self.closeReview()
        loaded = self._loadedCase if self._loadedCase and self._loadedCase["case"] == case else None
        if volumeNode is None and loaded is not None:
            volumeNode = loaded["volume"]
            segmentationNode = segmentationNode or loaded["segmentation"]
        heatmapNode = loaded["heatmap"] if loaded is not None and volumeNode is loaded["volume"] else None
        summary, _table = read_case_outputs(outputFolder, case)
        imageFingerprint = imagePath = None
        review = _bridge("review")
        if volumeNode is not None:
            geometry = _bridge("volumes").geometryFromVolumeNode(volumeNode)
            scored = Geometry.from_dict(summary["geometry"])
            if not geometry.matches(scored):
                raise errors.InputError(
                    _("Volume '{name}' ({grid}) is not the image case '{case}' was scored on ({scored}).").format(
                        name=volumeNode.GetName(), grid=geometry.describe(), case=case, scored=scored.describe()
                    )
                )
            imageFingerprint = review.imageFingerprintOfVolumeNode(volumeNode)
            storage = volumeNode.GetStorageNode()
            imagePath = storage.GetFileName() if storage is not None and storage.GetFileName() else None
        if loaded is not None and not imagePath:
            imagePath = loaded.get("imagePath")
        segmentId = self._chooseSegmentId(segmentationNode, segmentId)
        segmentationPath = None
        if segmentationNode is not None:
            if volumeNode is None:
                raise errors.InputError(_("A segmentation can only be reviewed together with its volume."))
            review.requireSegmentationOnVolumeGrid(segmentationNode, volumeNode)
            if loaded is not None and segmentationNode is loaded["segmentation"]:
                segmentationPath = loaded.get("segmentationPath")
            else:
                storage = segmentationNode.GetStorageNode()
                segmentationPath = storage.GetFileName() if storage is not None and storage.GetFileName() else None
        session = ReviewSession.open(
            outputFolder,
            case,
            reviewer,
            model_fingerprint=summary.get("model_fingerprint"),
            image_fingerprint=imageFingerprint,
            order=order,
            image_path=imagePath,
            segmentation_path=segmentationPath,
        )
        self.reviewer = reviewer
        if segmentationNode is not None and segmentId:
            self.preferredSegmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        self._review = {
            "session": session,
            "case": case,
            "outputFolder": outputFolder,
            "volume": volumeNode,
            "heatmap": heatmapNode,
            "segmentation": segmentationNode,
            "segmentId": segmentId,
            "original": loaded.get("originalSegmentation") if loaded is not None else None,
            "recontouring": {},  # slice -> original mask of the segment, taken by startRecontour
        }
        try:
            self._updateDecisionsTable()
        except Exception:
            session.close()
            self._review = None
            raise
        return session

    def _updateDecisionsTable(self):
        """Refill the decisions table node from the session (created on first use)."""
        review = self._requireReview()
        table = self.decisionsTableNode
        if table is not None and table.GetScene() is None:
            table = None
        table = _bridge("review").decisionsToTableNode(review["session"], table)
        table.SetName(_("{case} review decisions").format(case=review["case"]))
        self.decisionsTableNode = table
        return table

    def closeReview(self) -> None:
        """Release the open review's lock (its sidecar and the decisions table stay). Safe to call twice."""
        if self._review is not None:
            self._review["session"].close()
            self._review = None

    def reviewQueue(self) -> list:
        """Flagged slices of the open review in review order, each a dict: slice, score (normalised),
        anomalyFraction, decision ("accepted", "recontoured", "skipped" or None), note, change, label."""
        review = self._requireReview()
        session = review["session"]
        decided = session.decisions
        out = []
        for item in session.queue:
            record = decided.get(int(item["slice"])) or {}
            out.append(
                {
                    "slice": int(item["slice"]),
                    "score": item.get("normalised"),
                    "anomalyFraction": item.get("anomaly_fraction"),
                    "decision": record.get("decision"),
                    "note": record.get("note", ""),
                    "change": record.get("change"),
                    "label": record.get("label"),
                }
            )
        return out

    def reviewProgress(self) -> tuple:
        """(reviewed, total) flagged slices of the open review; (0, 0) when none is open."""
        if self._review is None:
            return (0, 0)
        return self._review["session"].progress()

    def reviewProgressText(self) -> str:
        """'7 of 19 reviewed' for the open review."""
        if self._review is None:
            return _("No review open.")
        reviewed, total = self.reviewProgress()
        return _("{reviewed} of {total} reviewed").format(reviewed=reviewed, total=total)

    def nextPendingSlice(self):
        """The first undecided slice in review order, or None when the review is complete."""
        item = self._requireReview()["session"].next_pending()
        return None if item is None else int(item["slice"])

    def jumpToReviewSlice(self, sliceIndex, sliceNodes=None):
        """Centre the slice views on the hottest region of `sliceIndex` of the case under review."""
        review = self._requireReview()
        if review["volume"] is None:
            raise self._errors().InputError(_("The review has no volume to show."))
        return self.jumpToFlaggedSlice(review["volume"], review["heatmap"], sliceIndex, sliceNodes=sliceNodes)

    def _decide(self, sliceIndex, decision, note="", change=None, labelPath=None) -> dict:
        review = self._requireReview()
        record = review["session"].decide(int(sliceIndex), decision, note=note, change=change, label_path=labelPath)
        review["recontouring"].pop(int(sliceIndex), None)
        self._updateDecisionsTable()
        return record

    def acceptSlice(self, sliceIndex, note="") -> dict:
        """Record that the segmentation is right on `sliceIndex`; returns the decision record."""
        return self._decide(sliceIndex, "accepted", note)

    def skipSlice(self, sliceIndex, note="") -> dict:
        """Record that `sliceIndex` was looked at but not decided on; returns the decision record."""
        return self._decide(sliceIndex, "skipped", note)

    def undoLastDecision(self):
        """Withdraw the most recent decision of the open review; returns it, or None."""
        review = self._requireReview()
        removed = review["session"].undo_last()
        self._updateDecisionsTable()
        return removed

    def _requireQueued(self, review, sliceIndex):
        if int(sliceIndex) not in {int(q["slice"]) for q in review["session"].queue}:
            raise self._errors().InputError(
                _("Slice {index} of case '{case}' is not a flagged slice of this review.").format(
                    index=sliceIndex, case=review["case"]
                )
            )

    def startRecontour(self, sliceIndex) -> dict:
        """Prepare recontouring `sliceIndex`: returns the recontour target (segmentation node ID, segment ID
        and name, source volume node ID, slice, RAS point of the hottest region; see
        AnomalyFlagMRML.review.recontourTarget) and remembers the segment's original labelmap, against
        which finishRecontour() measures the change. The GUI opens the Segment Editor on this target."""
        review = self._requireReview()
        errors = self._errors()
        if review["segmentation"] is None or not review["segmentId"]:
            raise errors.InputError(
                _("Case '{case}' has no segmentation in the review; load or select one to recontour.").format(
                    case=review["case"]
                )
            )
        self._requireQueued(review, sliceIndex)
        bridge = _bridge("review")
        target = bridge.recontourTarget(review["segmentation"], review["segmentId"], review["volume"], int(sliceIndex),
                                        review["heatmap"])  # fmt: skip
        if int(sliceIndex) not in review["recontouring"]:
            import numpy as np

            original = review["original"]
            if original is not None and original.GetScene() is not None:
                name = target["segmentName"]
                find = _bridge("segmentation").findSegmentId
                found = find(original, review["segmentId"]) or find(original, name)
                mask = (
                    bridge.segmentLabelmapArray(original, found, review["volume"])
                    if found
                    else np.zeros(review["volume"].GetImageData().GetDimensions()[::-1], dtype=bool)
                )
            else:
                mask = bridge.segmentLabelmapArray(review["segmentation"], review["segmentId"], review["volume"])
            review["recontouring"][int(sliceIndex)] = mask
        return target

    def recontouringSlices(self) -> list:
        """Slices on which startRecontour() was called and no decision was recorded since."""
        return sorted(self._review["recontouring"]) if self._review is not None else []

    def finishRecontour(self, sliceIndex, note="") -> dict:
        """Save the edited segmentation as the next <case>_seg_v{N}.seg.nrrd in the output folder (the
        original file is never written), measure the change on `sliceIndex` against the original
        segment (Dice, changed voxels) and record "recontoured" with the change and the saved file.
        Returns the decision record (its "label" is the saved file, relative to the output folder)."""
        review = self._requireReview()
        errors = self._errors()
        sliceIndex = int(sliceIndex)
        if sliceIndex not in review["recontouring"]:
            raise errors.InputError(
                _("Slice {index} is not being recontoured; press Recontour on it first.").format(index=sliceIndex)
            )
        bridge = _bridge("review")
        change = bridge.sliceChangeFromSegmentations(review["recontouring"][sliceIndex], review["segmentation"],
                                                     review["segmentId"], review["volume"], sliceIndex)  # fmt: skip
        path = bridge.saveEditedSegmentationVersion(review["segmentation"], review["outputFolder"], review["case"],
                                                    review["volume"])  # fmt: skip
        try:
            record = self._decide(sliceIndex, "recontoured", note, change=change, labelPath=path)
        except errors.AnomalyFlagError as exc:
            raise type(exc)(
                _("{error} The edited segmentation was saved as '{path}' but the decision was not recorded.").format(
                    error=exc, path=path
                )
            ) from None
        logging.info("AnomalyFlag: %s slice %d recontoured (Dice %.3f, %d voxels changed), saved %s",
                     review["case"], sliceIndex, change["dice"], change["changed_voxels"], path)  # fmt: skip
        return record

    # ------------------------------------------------------------------ worklist

    @property
    def worklistRows(self) -> list:
        """Rows of the loaded worklist.csv (rank, case, max_normalised_score, flagged_slices, ...)."""
        return list(self._worklist["rows"]) if self._worklist else []

    @property
    def worklistFolder(self):
        """Folder of the loaded worklist (a pathlib.Path), or None."""
        return self._worklist["folder"] if self._worklist else None

    @property
    def worklistIndex(self) -> int:
        """Index of the current case in worklistRows; -1 when no worklist is loaded."""
        return self._worklist["index"] if self._worklist else -1

    def loadWorklist(self, folder, reviewer=None, index=0, segmentName=None) -> dict:
        """Read `folder`/worklist.csv and load its case number `index` (0: the most anomalous) into the
        scene; with a reviewer name (or one used before) its review is opened too, recontouring the
        segment named `segmentName` (else the one reviewed before, else the first segment). Returns
        dict(case, index, volume, heatmap, segmentation) of the loaded case."""
        from AnomalyFlagLib.review.active_learning import WORKLIST_NAME, read_worklist

        errors = self._errors()
        folder = pathlib.Path(str(folder))
        path = folder / WORKLIST_NAME
        if not path.is_file():
            raise errors.InputError(
                _("'{folder}' has no {name}; create it with 'anomalyflag worklist'.").format(
                    folder=folder, name=WORKLIST_NAME
                )
            )
        try:
            rows = read_worklist(path)
        except (OSError, UnicodeDecodeError, KeyError) as exc:
            raise errors.InputError(_("'{path}' cannot be read: {error}").format(path=path, error=exc)) from None
        if not rows or any("case" not in r for r in rows):
            raise errors.InputError(_("'{path}' lists no cases.").format(path=path))
        if reviewer is not None:
            self.reviewer = str(reviewer).strip()
        if segmentName:
            self.preferredSegmentName = str(segmentName)
        previous = self._worklist
        self._worklist = {"folder": folder, "rows": rows, "index": -1}
        try:
            return self._goToCase(index)
        except Exception:
            if self._worklist["index"] == -1:  # nothing was loaded: keep the previous worklist
                self._worklist = previous
            raise

    def nextCase(self):
        """Close the current review and load (and open) the next case of the worklist; None at the end."""
        if not self._worklist or self._worklist["index"] + 1 >= len(self._worklist["rows"]):
            return None
        return self._goToCase(self._worklist["index"] + 1)

    def previousCase(self):
        """Close the current review and load (and open) the previous case of the worklist; None at the start."""
        if not self._worklist or self._worklist["index"] <= 0:
            return None
        return self._goToCase(self._worklist["index"] - 1)

    def _goToCase(self, index):
        """Load worklist case `index`; remove the previous case's nodes only once the new one is loaded."""
        errors = self._errors()
        rows, folder = self._worklist["rows"], self._worklist["folder"]
        if not 0 <= int(index) < len(rows):
            raise errors.InputError(_("The worklist has no case number {index}.").format(index=int(index) + 1))
        row = rows[int(index)]
        case = row["case"]
        imagePath = row.get("case_path") or None
        if not imagePath:
            try:
                summary = json.loads((folder / f"{case}_summary.json").read_text(encoding="utf-8"))
                imagePath = summary.get("image") or summary.get("source_image")
            except (OSError, ValueError):
                imagePath = None
        bridge = _bridge("review")
        segmentationPath = bridge.findOriginalSegmentation(imagePath, case)
        loaded = bridge.loadReviewCase(folder, case, imagePath, segmentationPath)
        loaded["case"] = case
        loaded["imagePath"] = str(imagePath)
        self.closeReview()
        if self._loadedCase is not None:
            bridge.removeReviewCase(self._loadedCase)
        self._loadedCase = loaded
        self._worklist["index"] = int(index)
        if self.reviewer:
            self.openReview(folder, case, self.reviewer)
        return {"case": case, "index": int(index), **{k: loaded[k] for k in ("volume", "heatmap", "segmentation")}}

    def unloadCase(self) -> None:
        """Close the review and remove the nodes loaded for the current worklist case."""
        self.closeReview()
        if self._loadedCase is not None:
            _bridge("review").removeReviewCase(self._loadedCase)
            self._loadedCase = None


#
# AnomalyFlagTest
#


class AnomalyFlagTest(ScriptedLoadableModuleTest):
    """Self-test: phantom CT -> tiny model trained on the spot -> scores through the Logic -> checks."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModelLocation()
        self.setUp()
        self.test_ScoreVolume()

    def test_ModelLocation(self):
        logic = AnomalyFlagLogic()
        candidates = logic.demoModelCandidates()
        self.assertEqual(candidates[0].parent.name, "Models")
        demo = logic.defaultModelPath()
        if demo is not None:
            self.assertTrue((demo / MODEL_METADATA_FILE).is_file())
            self.assertEqual(logic.resolveModelPath(""), demo)
        self.assertEqual(logic.resolveModelPath("/some/model"), pathlib.Path("/some/model"))

    def test_ScoreVolume(self):
        missing = AnomalyFlagDependencies.missingDependencies()
        if missing:
            self.delayDisplay(f"Skipping the scoring test: {', '.join(missing)} not installed")
            logging.warning("AnomalyFlagTest: scoring test skipped; missing %s", missing)
            return

        import tempfile

        import numpy as np
        from AnomalyFlagLib.config import PreprocessConfig
        from AnomalyFlagLib.detectors import DEFAULT_BACKEND, backend_class
        from AnomalyFlagLib.phantom import make_phantom, make_phantom_set
        from AnomalyFlagLib.training import train

        self.delayDisplay("Training a tiny model on phantom CTs")
        tempDir = tempfile.TemporaryDirectory(prefix="AnomalyFlagTest")
        self.addCleanup(tempDir.cleanup)
        root = pathlib.Path(tempDir.name)
        numSlices, size = 24, 64
        make_phantom_set(root / "normal", num_cases=3, anomalous=False, seed=0, num_slices=numSlices, size=size)
        modelPath = train(
            root / "normal",
            root / "model",
            DEFAULT_BACKEND,
            *backend_class(DEFAULT_BACKEND).tiny(),
            PreprocessConfig(image_size=64, fov_mm=None),
            device="cpu",
            log=logging.info,
        )

        self.delayDisplay("Scoring a phantom with a stent")
        phantom = make_phantom(num_slices=numSlices, size=size, seed=5, anomalies=["metal_stent"])
        paths = phantom.save(root / "case", "stent")
        volumeNode = slicer.util.loadVolume(str(paths["image"]))
        logic = AnomalyFlagLogic()
        progressCalls = []
        outputs = logic.scoreVolume(
            volumeNode, modelPath=modelPath, device="cpu", progress=lambda d, t: progressCalls.append((d, t))
        )
        self.assertTrue(progressCalls and progressCalls[-1][0] == progressCalls[-1][1] == numSlices)

        # Heatmap: same grid as the CT, voxel for voxel.
        heatmap = outputs["heatmap"]
        self.assertIsNotNone(heatmap)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
        inputMatrix, heatmapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(inputMatrix)
        heatmap.GetIJKToRASMatrix(heatmapMatrix)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(inputMatrix.GetElement(r, c), heatmapMatrix.GetElement(r, c), places=6)
        heatmapArray = slicer.util.arrayFromVolume(heatmap).copy()
        self.assertEqual(heatmapArray.shape, (numSlices, size, size))

        # Table: one row per slice.
        table = outputs["table"]
        self.assertEqual(table.GetNumberOfRows(), numSlices)
        self.assertEqual(len(outputs["result"].slices), numSlices)
        flagged = logic.flaggedSlices(table)
        self.assertEqual(flagged, sorted(outputs["result"].flagged_indices))

        # Display: heatmap over the CT in the slice views, with a colour table and a threshold.
        displayNode = heatmap.GetDisplayNode()
        self.assertIsNotNone(displayNode)
        self.assertTrue(displayNode.GetColorNodeID())
        composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(composites.GetNumberOfItems()):
            composite = composites.GetItemAsObject(i)
            self.assertEqual(composite.GetBackgroundVolumeID(), volumeNode.GetID())
            self.assertEqual(composite.GetForegroundVolumeID(), heatmap.GetID())
            self.assertGreater(composite.GetForegroundOpacity(), 0.0)
        self.assertIsNotNone(outputs["chart"])

        # Navigation to a slice does not fail (flagged or not).
        logic.jumpToFlaggedSlice(volumeNode, heatmap, flagged[0] if flagged else numSlices // 2)

        # A threshold nobody reaches flags nothing; the same nodes are reused.
        again = logic.scoreVolume(volumeNode, modelPath=modelPath, device="cpu", thresholdOverride=1.0e6,
                                  heatmapNode=heatmap, tableNode=table, chartNode=outputs["chart"])  # fmt: skip
        self.assertIs(again["heatmap"], heatmap)
        self.assertEqual(logic.flaggedSlices(again["table"]), [])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(heatmap), heatmapArray))
        self.delayDisplay("Test passed")
