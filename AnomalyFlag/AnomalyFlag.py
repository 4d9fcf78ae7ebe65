"""AnomalyFlag: flags CT slices on which an automatic segmentation is likely to fail.

The thin Slicer layer: module description, parameter node, the panel (binds the GUI to the parameter node and
calls the Logic), the Logic and the self-test. The detector is in ``AnomalyFlagLib``, the MRML glue and the
scoring and review controllers in ``AnomalyFlagMRML``; neither imports torch before a model is loaded, so the
module loads before torch is installed (see ``AnomalyFlagDependencies``).
"""

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

# The library and bridge packages sit next to this file (source tree and installed extension alike).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

import AnomalyFlagDependencies  # Qt-free, imports neither torch nor MONAI
from AnomalyFlagLib.errors import AnomalyFlagError
from AnomalyFlagMRML import workflow
from AnomalyFlagMRML.constants import ATTR_ROLE, DEVICE_CHOICES, MODEL_METADATA_FILE, ROLE_HEATMAP
from AnomalyFlagMRML.i18n import tr as _
from AnomalyFlagMRML.i18n import translate
from AnomalyFlagMRML.navigation import jumpToSlice
from AnomalyFlagMRML.reviewController import ReviewController
from AnomalyFlagMRML.runner import ThreadRunner
from AnomalyFlagMRML.scoreTable import flaggedSlicesFromTable, tableThreshold
from AnomalyFlagMRML.scoringController import ScoringController, checkScoringInputs, resultSummary
from AnomalyFlagMRML.segmentation import roiMaskFromSegmentation
from AnomalyFlagMRML.volumes import arrayAndGeometryFromVolumeNode
from AnomalyFlagWidgets.reviewSection import ReviewSection
from AnomalyFlagWidgets.sliceList import fillSliceList, sliceOfItem

DEMO_MODEL_NAME = "AnomalyFlagDemoChestCT"
POLL_INTERVAL_MS = 100


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
            "restoration (Kascenas et al., MIDL 2022), DRAEM (Zavrtanik et al., ICCV 2021), f-AnoGAN "
            "(Schlegl et al., Medical Image Analysis 2019), StyleGAN2 (Karras et al., CVPR 2020), GANomaly "
            "(Akcay et al., ACCV 2018), Progressive GANomaly (Madzia-Madzou and Kuijf, SPIE Medical Imaging "
            "2022), ASC-Net (Dey and Hong, MICCAI 2021) and DeScarGAN (Wolleb et al., MICCAI 2020). It is a "
            "research tool, not a medical device."
        )


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


class AnomalyFlagWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: binds the GUI to the parameter node and shows what the Logic's scoring and review
    controllers report."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._updatingSegmentSelector = False
        self.reviewSection = None

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
        self.ui.flaggedSlicesListWidget.connect("currentRowChanged(int)", self.onFlaggedSliceSelected)
        self.ui.useDemoModelButton.connect("clicked(bool)", self.onUseDemoModel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.previousFlaggedButton.connect("clicked(bool)", self.onPreviousFlagged)
        self.ui.nextFlaggedButton.connect("clicked(bool)", self.onNextFlagged)
        self.reviewSection = ReviewSection(self.ui, self.logic.review, lambda: self._parameterNode, self._setStatus,
                                           self.parent)  # fmt: skip
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False
        self._updateFlaggedNavigation()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollRunner)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.scoring.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.reviewSection is not None:
            self.reviewSection.cleanup()
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()  # a run in progress still publishes into its output nodes

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.scoring.cancel()
        self.setParameterNode(None)
        self._clearFlaggedList()
        self.reviewSection.onSceneStartClose()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the first volume that is no heatmap."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and firstVolumeNode.GetAttribute(ATTR_ROLE) != ROLE_HEATMAP:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[AnomalyFlagParameterNode]) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._updateSegmentSelectorFromParameterNode()
        self._checkCanApply()

    # ------------------------------------------------------------------ GUI state

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable Apply only when the inputs are valid; say why not in the tooltip."""
        if not hasattr(self, "ui"):
            return
        p = self._parameterNode
        if p is None:
            reason, modelText = _("The module is not initialised."), ""
        else:
            reason, modelText = self.logic.checkInputs(p.inputVolume, p.modelPath, p.heatmapVolume)
        if self.logic.scoring.isRunning():
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
            self._pollTimer.start()
        else:
            self._pollTimer.stop()
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

    # ------------------------------------------------------------------ model and dependencies

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
            elif AnomalyFlagDependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                self._log(_("Installed: {packages}").format(packages=", ".join(missing)))

    def _ensureDependencies(self) -> bool:
        """True when torch, MONAI and safetensors can be imported; asks to install them when not."""
        missing = AnomalyFlagDependencies.missingDependencies()
        if missing and not AnomalyFlagDependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay):
            self._setStatus(_("Not started: {packages} must be installed first.").format(packages=", ".join(missing)))
            return False
        return True

    # ------------------------------------------------------------------ scoring

    def onApplyButton(self) -> None:
        """Read the inputs on the main thread, then score in the background, polled by a timer."""
        if self.logic.scoring.isRunning():
            return
        self.ui.logTextEdit.clear()
        self._clearFlaggedList()
        with slicer.util.tryWithErrorDisplay(_("Anomaly scoring could not start."), waitCursor=True):
            if not self._ensureDependencies():
                return
            p = self._parameterNode
            job = self.logic.prepareScoring(p.inputVolume, modelPath=p.modelPath, segmentationNode=p.segmentation,
                                            segmentId=p.segmentId or None, device=p.device,
                                            batchSize=p.batchSize or None)  # fmt: skip
            self._setStatus(_("Scoring '{volume}' with model {model} ...").format(
                volume=p.inputVolume.GetName(), model=job["modelPath"]))  # fmt: skip
            self.logic.startScoring(job, p.inputVolume, segmentationNode=p.segmentation,
                                    thresholdOverride=p.thresholdOverride or None, heatmapNode=p.heatmapVolume,
                                    tableNode=p.scoreTable, chartNode=p.scoreChart)  # fmt: skip
            self._setRunning(True)

    def onCancelButton(self) -> None:
        if self.logic.scoring.isRunning():
            self.logic.scoring.cancel()
            self.ui.cancelButton.enabled = False
            self._setStatus(_("Cancelling ..."))

    def onPollRunner(self) -> None:
        """Show what the background scoring reported since the last tick (runs on the GUI thread)."""
        try:
            for kind, *args in self.logic.scoring.poll():
                if kind == "progress":
                    self.ui.progressBar.setRange(0, max(args[1], 1))
                    self.ui.progressBar.value = args[0]
                    self.ui.statusLabel.text = _("Scored {done} of {total} slices").format(done=args[0], total=args[1])
                elif kind == "log":
                    self._log(args[0])
                elif kind == "done":
                    self._showOutputs(args[0])
                elif kind == "cancelled":
                    self._setStatus(_("Scoring cancelled; nothing was changed in the scene."))
                elif kind == "discarded":
                    self._setStatus(_("The scene was closed or the input volume removed while scoring; result "
                                      "discarded."))  # fmt: skip
                else:
                    self._showRunError(kind, *args)
        except Exception as exc:  # a bug here must not leave the timer firing forever
            self.logic.scoring.abandon()
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(_("Anomaly scoring failed: {error}").format(error=exc))
        finally:
            if not self.logic.scoring.isRunning():
                self._setRunning(False)

    def _showRunError(self, kind, exc, tb) -> None:
        if kind == "publishError":
            slicer.util.errorDisplay(_("Scoring finished but the results could not be shown.\n\n{error}").format(
                error=exc), detailedText=tb)  # fmt: skip
            return
        self._setStatus(_("Scoring failed."))
        if tb:
            logging.error("AnomalyFlag scoring failed:\n%s", tb)
            self.ui.logTextEdit.appendPlainText(str(tb))
        if isinstance(exc, AnomalyFlagError):
            slicer.util.errorDisplay(_("Anomaly scoring failed:\n{error}").format(error=exc))
        else:
            slicer.util.errorDisplay(
                _("Anomaly scoring failed ({kind}): {error}").format(kind=type(exc).__name__, error=exc),
                detailedText=str(tb),
            )

    def _showOutputs(self, outputs) -> None:
        """Select the output nodes, show the chart and the flagged slices of a published result."""
        p, result = self._parameterNode, outputs["result"]
        if p is not None:
            p.heatmapVolume, p.scoreTable, p.scoreChart = outputs["heatmap"], outputs["table"], outputs["chart"]
        try:
            slicer.modules.plots.logic().ShowChartInLayout(outputs["chart"])
        except Exception as exc:  # the Plots module may be disabled; the chart is in the scene anyway
            logging.warning("AnomalyFlag: cannot show the score chart: %s", exc)
        self._populateFlaggedList(outputs["table"], result)
        if result.warnings:
            logging.warning("AnomalyFlag: %s", result.warning_text())
        self._setStatus(resultSummary(result))

    # ------------------------------------------------------------------ flagged slices

    def _clearFlaggedList(self) -> None:
        self.ui.flaggedSlicesListWidget.clear()
        self.ui.flaggedSummaryLabel.text = _("No results yet.")
        self._updateFlaggedNavigation()

    def _populateFlaggedList(self, tableNode, result) -> None:
        """List the flagged slices of the table with their normalised score."""
        flagged, scores = self.logic.flaggedSlices(tableNode), result.slices["normalised"]
        fillSliceList(self.ui.flaggedSlicesListWidget, [(_("Slice {index}    score {score}").format(
            index=k, score=f"{float(scores[k]):.2f}"), k) for k in flagged])  # fmt: skip
        if flagged:
            threshold = tableThreshold(tableNode)
            self.ui.flaggedSummaryLabel.text = _(
                "{count} flagged slice(s). Select one to show it; scores are normalised (threshold {threshold})."
            ).format(count=len(flagged), threshold="?" if threshold is None else f"{threshold:.2f}")
        else:
            self.ui.flaggedSummaryLabel.text = _("No slice is over the threshold.")
        self._updateFlaggedNavigation()

    def _updateFlaggedNavigation(self) -> None:
        count, row = self.ui.flaggedSlicesListWidget.count, self.ui.flaggedSlicesListWidget.currentRow
        self.ui.previousFlaggedButton.enabled = count > 0 and row > 0
        self.ui.nextFlaggedButton.enabled = count > 0 and row < count - 1

    def onFlaggedSliceSelected(self, row: int) -> None:
        self._updateFlaggedNavigation()
        sliceIndex = sliceOfItem(self.ui.flaggedSlicesListWidget.item(row) if row >= 0 else None)
        if sliceIndex is None or not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot show the flagged slice.")):
            p = self._parameterNode
            self.logic.jumpToFlaggedSlice(p.inputVolume, p.heatmapVolume, sliceIndex)

    def onPreviousFlagged(self) -> None:
        self.ui.flaggedSlicesListWidget.setCurrentRow(max(self.ui.flaggedSlicesListWidget.currentRow - 1, 0))

    def onNextFlagged(self) -> None:
        listWidget = self.ui.flaggedSlicesListWidget
        listWidget.setCurrentRow(min(listWidget.currentRow + 1, listWidget.count - 1))


def _computeScoresTask(progress, log, cancelRequested, **job):
    """Worker-thread body: scores arrays only (no MRML, no Qt)."""
    return AnomalyFlagLogic.computeScores(progress=progress, log=log, cancel=cancelRequested, **job)


class AnomalyFlagLogic(ScriptedLoadableModuleLogic):
    """Scoring without the GUI, the panel's background scoring (``scoring``, a ScoringController whose runners
    `runnerFactory` makes) and the review loop (``review``, a ReviewController, both in AnomalyFlagMRML);
    usable from Slicer's Python console::

        logic = slicer.util.getModuleLogic("AnomalyFlag")
        outputs = logic.scoreVolume(slicer.util.getNode("CT"), device="cpu")
        print(logic.flaggedSlices(outputs["table"]))
        logic.jumpToFlaggedSlice(slicer.util.getNode("CT"), outputs["heatmap"], 12)
        logic.review.loadWorklist("/data/scores", reviewer="Dr Ann")

    torch and MONAI are imported on the first scoring call, after checking that they are installed;
    ``AnomalyFlagDependencies.installDependencies()`` installs them (it asks first).
    """

    def __init__(self, runnerFactory=ThreadRunner) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.scoring = ScoringController(runnerFactory)
        self.review = ReviewController()

    def getParameterNode(self) -> AnomalyFlagParameterNode:
        return AnomalyFlagParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ model location and inputs

    @staticmethod
    def demoModelCandidates() -> list:
        """Where the demo model bundle may be, in order of preference: ``<module dir>/Resources/Models/<name>``
        in the build tree and the installed extension (AnomalyFlag/CMakeLists.txt copies it there from the
        repository's ``Resources/Models``), ``<module dir>/../Resources/Models/<name>`` in a source checkout."""
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

    def checkInputs(self, inputVolume, modelPath, heatmapVolume=None) -> tuple:
        """(problem, modelText): why scoring cannot start (None when it can), and which model it would use."""
        resolved = self.resolveModelPath(modelPath, required=False)
        return checkScoringInputs(inputVolume, resolved, self.defaultModelPath(), heatmapVolume)

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
        array, geometry = arrayAndGeometryFromVolumeNode(inputVolumeNode)
        roiMask = None
        if segmentationNode is not None and segmentId:
            roiMask = roiMaskFromSegmentation(segmentationNode, [segmentId], inputVolumeNode)
        return {"array": array, "geometry": geometry, "modelPath": resolved, "roiMask": roiMask,
                "device": device or "auto", "batchSize": batchSize or None, "roiMarginMm": roiMarginMm,
                "name": inputVolumeNode.GetName()}  # fmt: skip

    @staticmethod
    def computeScores(array, geometry, modelPath, roiMask=None, device="auto", batchSize=None, roiMarginMm=10.0,
                      name="volume", progress=None, log=None, cancel=None):  # fmt: skip
        """Any thread: score the slices of an array (no MRML access). Returns a CaseResult."""
        if log is not None:
            log(_("Loading model {path} on device '{device}' ...").format(path=modelPath, device=device))
        return workflow.computeScores(array, geometry, modelPath, roiMask=roiMask, device=device, batchSize=batchSize,
                                      roiMarginMm=roiMarginMm, name=name, progress=progress, cancel=cancel)  # fmt: skip

    def startScoring(self, job, inputVolumeNode, **publishOptions) -> None:
        """Start computeScores(**job) in the background (``scoring``); its result is published on
        `inputVolumeNode` with `publishOptions` (as publishResult's) when ``scoring.poll()`` sees it end."""
        self.scoring.start(_computeScoresTask, job, inputVolumeNode, **publishOptions)

    def publishResult(self, result, inputVolumeNode, segmentationNode=None, thresholdOverride=None,
                      heatmapNode=None, tableNode=None, chartNode=None) -> dict:  # fmt: skip
        """Main thread: write a CaseResult into heatmap, table and chart nodes (created when None) and show
        the heatmap over the input with the segmentation outlines. A threshold override re-flags slices.

        Returns dict(heatmap=, table=, chart=, result=) where result carries the threshold used.
        """
        return workflow.publishResult(result, inputVolumeNode, segmentationNode=segmentationNode,
                                      thresholdOverride=thresholdOverride, heatmapNode=heatmapNode,
                                      tableNode=tableNode, chartNode=chartNode)  # fmt: skip

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
        return workflow.scoreFolder(self.resolveModelPath(modelPath), inputFolder, outputFolder, device=device,
                                    batchSize=batchSize, snapshots=snapshots, progress=progress, cancel=cancel,
                                    **options)  # fmt: skip

    @staticmethod
    def flaggedSlices(tableNode) -> list:
        """Slice indices flagged in an AnomalyFlag score table, in slice order."""
        return [] if tableNode is None else [int(i) for i in flaggedSlicesFromTable(tableNode)]

    def jumpToFlaggedSlice(self, volumeNode, heatmapNode, sliceIndex, sliceNodes=None):
        """Centre the slice views on voxel slice `sliceIndex` of `volumeNode` with the heatmap shown."""
        if volumeNode is None:
            raise ValueError(_("No volume to navigate in."))
        return jumpToSlice(volumeNode, heatmapNode, int(sliceIndex), sliceNodes=sliceNodes)


class AnomalyFlagTest(ScriptedLoadableModuleTest):
    """What only the application can show (pytest covers the Logic and the review loop on MRML): the panel
    loaded from the .ui and bound to the parameter node, scoring through the panel (worker thread polled by
    the Qt timer, outputs in the application's views) and the hand-over of a slice to the Segment Editor."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_Panel()
        self.setUp()
        self.test_ScoreAndRecontourThroughThePanel()

    def _widget(self):
        slicer.util.selectModule("AnomalyFlag")
        return slicer.modules.anomalyflag.widgetRepresentation().self()

    def test_Panel(self):
        widget = self._widget()
        widget._parameterNode.device = "cpu"
        self.assertEqual(widget.ui.deviceComboBox.currentText, "cpu")
        self.assertFalse(widget.ui.applyButton.enabled)  # the scene holds no volume to score
        self.assertEqual(widget.ui.reviewCaseLabel.text, widget.logic.review.caseText())

    def test_ScoreAndRecontourThroughThePanel(self):
        if AnomalyFlagDependencies.missingDependencies():
            self.delayDisplay("Skipped scoring through the panel: PyTorch, MONAI or safetensors is not installed")
            return
        import tempfile
        import time

        from AnomalyFlagLib.config import PreprocessConfig
        from AnomalyFlagLib.detectors import DEFAULT_BACKEND, backend_class
        from AnomalyFlagLib.phantom import make_phantom, make_phantom_set
        from AnomalyFlagLib.training import train
        from AnomalyFlagMRML.review import recontourTarget
        from AnomalyFlagMRML.segmentation import loadSegmentation
        from AnomalyFlagWidgets.reviewSection import openSegmentEditor, segmentEditorWidget

        self.delayDisplay("Training a tiny model on phantom CTs")
        tempDir = tempfile.TemporaryDirectory(prefix="AnomalyFlagTest")
        self.addCleanup(tempDir.cleanup)
        root = pathlib.Path(tempDir.name)
        make_phantom_set(root / "normal", num_cases=3, anomalous=False, seed=0, num_slices=24, size=64)
        modelPath = train(root / "normal", root / "model", DEFAULT_BACKEND, *backend_class(DEFAULT_BACKEND).tiny(),
                          PreprocessConfig(image_size=64, fov_mm=None), device="cpu", log=logging.info)  # fmt: skip
        paths = make_phantom(num_slices=24, size=64, seed=5, anomalies=["metal_stent"]).save(root / "case", "stent")
        volume = slicer.util.loadVolume(str(paths["image"]))

        self.delayDisplay("Scoring through the panel")
        widget = self._widget()
        p = widget._parameterNode
        p.inputVolume, p.modelPath, p.device = volume, modelPath, "cpu"
        widget.ui.applyButton.click()
        deadline = time.time() + 300
        while widget.logic.scoring.isRunning() and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNotNone(p.heatmapVolume, widget.ui.statusLabel.text)
        flagged = widget.logic.flaggedSlices(p.scoreTable)
        self.assertEqual(widget.ui.flaggedSlicesListWidget.count, len(flagged))
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(red.GetBackgroundVolumeID(), volume.GetID())
        self.assertEqual(red.GetForegroundVolumeID(), p.heatmapVolume.GetID())

        self.delayDisplay("Handing a slice over to the Segment Editor")
        segmentation = loadSegmentation(paths["organs"], referenceVolumeNode=volume)
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        openSegmentEditor(recontourTarget(segmentation, segmentId, volume, (flagged or [12])[0], p.heatmapVolume))
        editor = segmentEditorWidget()
        source = editor.sourceVolumeNode() if hasattr(editor, "sourceVolumeNode") else editor.masterVolumeNode()
        self.assertEqual(editor.segmentationNode().GetID(), segmentation.GetID())
        self.assertEqual(source.GetID(), volume.GetID())
        self.assertEqual(editor.currentSegmentID(), segmentId)
        self.delayDisplay("Test passed")
