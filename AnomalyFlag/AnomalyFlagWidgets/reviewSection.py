"""The Review section of the module panel: binds its widgets, keyboard shortcuts and the Segment Editor
hand-over to the ReviewController (AnomalyFlagMRML.reviewController), which holds the review itself."""

import pathlib

import qt
import slicer
from AnomalyFlagMRML.i18n import tr as _
from AnomalyFlagMRML.navigation import jumpToPoint
from AnomalyFlagMRML.review import prepareSegmentEditorNode

from .sliceList import fillSliceList, selectSlice, sliceOfItem

SHORTCUTS = (("A", "onAcceptSlice"), ("R", "onRecontourSlice"), ("S", "onSkipSlice"), ("X", "onAbnormalSlice"))
"""Keys of the review, active while the panel is shown (a line edit with focus keeps its letters)."""


def segmentEditorWidget():
    """The Segment Editor module's editor widget (qMRMLSegmentEditorWidget)."""
    return slicer.modules.segmenteditor.widgetRepresentation().self().editor


def openSegmentEditor(target) -> None:
    """Switch to the Segment Editor with the segmentation, source volume and segment of a recontour target
    (AnomalyFlagMRML.review.recontourTarget) selected, and centre the views on the target's hot spot."""
    slicer.util.selectModule("SegmentEditor")
    editor = segmentEditorWidget()
    prepareSegmentEditorNode(target, editor.mrmlSegmentEditorNode(), slicer.mrmlScene)
    editor.updateWidgetFromMRML()
    jumpToPoint(target["sliceRAS"], slicer.mrmlScene)


class ReviewSection:
    """`ui`: the panel's widgets; `review`: a ReviewController; `parameterNode()`: the panel's parameter node
    (reviewer, worklist folder, and the inputs a loaded case is shown in); `setStatus(text)`: the status line."""

    def __init__(self, ui, review, parameterNode, setStatus, shortcutParent) -> None:
        self.ui = ui
        self.review = review
        self.parameterNode = parameterNode
        self.setStatus = setStatus
        self._recontourSlice = None
        self.ui.reviewSlicesListWidget.connect("currentRowChanged(int)", self.onReviewSliceSelected)
        self.ui.loadWorklistButton.connect("clicked(bool)", self.onLoadWorklist)
        self.ui.previousCaseButton.connect("clicked(bool)", self.onPreviousCase)
        self.ui.nextCaseButton.connect("clicked(bool)", self.onNextCase)
        self.ui.acceptSliceButton.connect("clicked(bool)", self.onAcceptSlice)
        self.ui.recontourSliceButton.connect("clicked(bool)", self.onRecontourSlice)
        self.ui.skipSliceButton.connect("clicked(bool)", self.onSkipSlice)
        self.ui.abnormalSliceButton.connect("clicked(bool)", self.onAbnormalSlice)
        self.ui.finishRecontourButton.connect("clicked(bool)", self.onFinishRecontour)
        self.ui.undoDecisionButton.connect("clicked(bool)", self.onUndoDecision)
        self._shortcuts = []
        for key, slot in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), shortcutParent)
            shortcut.connect("activated()", getattr(self, slot))
            self._shortcuts.append(shortcut)
        self.updateGui()

    def cleanup(self) -> None:
        """Drop the shortcuts and release the case's review lock (the decisions are already saved)."""
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        self.review.closeReview()

    def onSceneStartClose(self) -> None:
        self.review.unloadCase()
        self.review.decisionsTableNode = None
        self._recontourSlice = None
        self.updateGui()

    def updateGui(self) -> None:
        """Case label, progress, the flagged-slice list with scores and decisions, button states."""
        review = self.review
        session = review.reviewSession
        index, count = review.worklistIndex, len(review.worklistRows)
        self.ui.reviewCaseLabel.text = review.caseText()
        self.ui.reviewProgressLabel.text = review.reviewProgressText()
        self.ui.previousCaseButton.enabled = index > 0
        self.ui.nextCaseButton.enabled = 0 <= index < count - 1
        queue = review.reviewQueue() if session is not None else []
        fillSliceList(self.ui.reviewSlicesListWidget, [(review.queueItemText(q), q["slice"]) for q in queue],
                      self._selectedSlice())  # fmt: skip
        hasSlice = self._selectedSlice() is not None
        self.ui.acceptSliceButton.enabled = hasSlice
        self.ui.skipSliceButton.enabled = hasSlice
        self.ui.abnormalSliceButton.enabled = hasSlice
        self.ui.recontourSliceButton.enabled = hasSlice and bool(review.reviewCase.get("segmentation"))
        self.ui.finishRecontourButton.enabled = session is not None and bool(review.recontouringSlices())
        self.ui.undoDecisionButton.enabled = session is not None and bool(session.history)
        self.ui.decisionsTableView.setMRMLTableNode(review.decisionsTableNode)

    def _selectedSlice(self):
        """The slice selected in the review list while a review is open, else None."""
        if self.review.reviewSession is None:
            return None
        return sliceOfItem(self.ui.reviewSlicesListWidget.currentItem())

    def _selectNextPending(self) -> None:
        if self.review.reviewSession is None:
            return
        nextSlice = self.review.nextPendingSlice()
        if nextSlice is not None:
            selectSlice(self.ui.reviewSlicesListWidget, nextSlice)
        else:
            self.setStatus(_("All flagged slices of this case are reviewed."))

    def _showCase(self, case) -> None:
        """Show a case loaded from the worklist in the Inputs section and select its first pending slice."""
        self._recontourSlice = None
        p = self.parameterNode()
        if case and p is not None:
            p.inputVolume, p.heatmapVolume, p.segmentation = case["volume"], case["heatmap"], case["segmentation"]
        self.updateGui()
        if self.review.reviewSession is None and case:
            self.setStatus(_("Case {case} loaded; enter the reviewer name and press Load to review it.").format(
                case=case["case"]))  # fmt: skip
        self._selectNextPending()

    def onLoadWorklist(self) -> None:
        p = self.parameterNode()
        try:
            with slicer.util.tryWithErrorDisplay(_("The worklist could not be loaded."), waitCursor=True):
                folder = p.worklistFolder
                sameFolder = folder is not None and self.review.worklistFolder == pathlib.Path(str(folder))
                segment = p.segmentation.GetSegmentation().GetSegment(p.segmentId) if p.segmentation else None
                case = self.review.loadWorklist(folder, reviewer=p.reviewer,
                                                index=max(self.review.worklistIndex, 0) if sameFolder else 0,
                                                segmentName=segment.GetName() if segment else None)  # fmt: skip
                self._showCase(case)
        finally:
            self.updateGui()

    def _changeCase(self, step) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("The case could not be loaded."), waitCursor=True):
                self.review.reviewer = (self.parameterNode().reviewer or "").strip()
                self._showCase(self.review.nextCase() if step > 0 else self.review.previousCase())
        finally:
            self.updateGui()

    def onPreviousCase(self) -> None:
        self._changeCase(-1)

    def onNextCase(self) -> None:
        self._changeCase(+1)

    def onReviewSliceSelected(self, row: int) -> None:
        self.updateGui()
        sliceIndex = self._selectedSlice()
        if sliceIndex is not None:
            with slicer.util.tryWithErrorDisplay(_("Cannot show the flagged slice.")):
                self.review.jumpToReviewSlice(sliceIndex)

    def _decideSelected(self, method) -> None:
        sliceIndex = self._selectedSlice()
        if sliceIndex is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The decision was not saved."), waitCursor=True):
            method(sliceIndex, note=self.ui.reviewNoteLineEdit.text)
            self.ui.reviewNoteLineEdit.text = ""
            self.updateGui()
            self._selectNextPending()

    def onAcceptSlice(self) -> None:
        self._decideSelected(self.review.acceptSlice)

    def onSkipSlice(self) -> None:
        self._decideSelected(self.review.skipSlice)

    def onAbnormalSlice(self) -> None:
        self._decideSelected(self.review.confirmAbnormal)

    def onUndoDecision(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The decision could not be withdrawn.")):
            removed = self.review.undoLastDecision()
            self.updateGui()
            if removed:
                selectSlice(self.ui.reviewSlicesListWidget, int(removed["slice"]))

    def onRecontourSlice(self) -> None:
        """Open Slicer's Segment Editor on the selected flagged slice with the segment selected."""
        sliceIndex = self._selectedSlice()
        if sliceIndex is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start recontouring."), waitCursor=True):
            target = self.review.startRecontour(sliceIndex)
            self._recontourSlice = sliceIndex
            openSegmentEditor(target)
            message = _(
                "Recontouring slice {index} (segment '{segment}'): edit it in the Segment Editor, then come back "
                "and press 'Finish recontour / Save version'."
            )
            self.setStatus(message.format(index=sliceIndex, segment=target["segmentName"]))
            self.updateGui()

    def onFinishRecontour(self) -> None:
        slices = self.review.recontouringSlices()
        if self.review.reviewSession is None or not slices:
            return
        sliceIndex = self._recontourSlice if self._recontourSlice in slices else slices[0]
        with slicer.util.tryWithErrorDisplay(_("The edited segmentation was not saved."), waitCursor=True):
            try:  # let an active effect (e.g. a pending paint stroke) finish before the segmentation is read
                segmentEditorWidget().setActiveEffect(None)
            except AttributeError:
                pass
            record = self.review.finishRecontour(sliceIndex, note=self.ui.reviewNoteLineEdit.text)
            self.ui.reviewNoteLineEdit.text = ""
            self._recontourSlice = None
            change = record["change"]
            self.setStatus(
                _("Slice {index} recontoured: Dice {dice}, {voxels} voxels changed; saved as {file}.").format(
                    index=sliceIndex,
                    dice=f"{change['dice']:.3f}",
                    voxels=change["changed_voxels"],
                    file=record["label"],
                )
            )
            self.updateGui()
            self._selectNextPending()
