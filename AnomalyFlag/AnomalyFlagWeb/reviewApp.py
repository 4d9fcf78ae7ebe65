"""The review page: a trame app over the module's own review loop (AnomalyFlagMRML.reviewController).

One process holds a trame-slicer SlicerApp (real MRML, slice view, displayable managers, segmentation
editor) and one ReviewController on its scene. The page shows the current case's CT with the heatmap and
the segmentation outlines in an axial slice view, the score chart and the flagged-slice list; Accept,
Skip, Abnormal and Recontour record decisions through the controller (sidecar and lock of
AnomalyFlagLib.review), Recontour hands the slice to trame-slicer's segmentation editor and Finish saves a
new label version. Every error is shown in the page.
"""

import functools
import logging
import traceback
from pathlib import Path

import slicer
import vtk
from AnomalyFlagLib.errors import AnomalyFlagError
from AnomalyFlagLib.io.scored_case import read_scored_case
from AnomalyFlagLib.review.label_versions import latest_version
from AnomalyFlagMRML.i18n import tr as _
from AnomalyFlagMRML.navigation import jumpToPoint, sliceFrame
from AnomalyFlagMRML.reviewController import ReviewController
from AnomalyFlagMRML.volumes import arrayFromVTKMatrix
from trame.app import get_server
from trame.ui.vuetify3 import SinglePageLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trameSlicerModule
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from undo_stack import UndoStack

from .scoreChart import DECISION_COLORS, scoreChartSvg

REVIEW_KEYS = {"a": "accept", "s": "skip", "r": "recontour", "x": "abnormal"}
"""Keyboard shortcuts of the page: the letters of the module's Review section (AnomalyFlagWidgets.reviewSection)."""

LAYOUT_ID = "AnomalyFlag review"
SIDE_PANEL_STYLE = "flex: 0 0 460px; overflow-y: auto; padding: 8px;"

KEY_LISTENER = (
    "window.addEventListener('keydown', (e) => {"
    " const t = e.target && e.target.tagName;"
    " if (t === 'INPUT' || t === 'TEXTAREA' || e.ctrlKey || e.metaKey || e.altKey) { return; }"
    " trigger('anomalyflag_key', [e.key.toLowerCase()]);"
    "})"
)


def _decisionText(decision):
    names = {"accepted": _("accepted"), "recontoured": _("recontoured"), "skipped": _("skipped"),
             "abnormal": _("confirmed abnormal")}  # fmt: skip
    return names.get(decision, _("pending"))


def _guarded(method):
    """Run a page action; an error goes to the page (errorText), never out of the handler."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.state:
            self.state.errorText = ""
            try:
                return method(self, *args, **kwargs)
            except (AnomalyFlagError, OSError) as exc:
                logging.warning("AnomalyFlag review server: %s", exc)
                self.state.errorText = str(exc)
            except Exception as exc:  # a bug must not leave a dead page
                logging.error("AnomalyFlag review server: %s", traceback.format_exc())
                self.state.errorText = _("Unexpected error: {error}").format(error=exc)
            finally:
                try:
                    self._refresh()
                except Exception as exc:
                    logging.error("AnomalyFlag review server: %s", traceback.format_exc())
                    self.state.errorText = self.state.errorText or str(exc)

    return run


class ReviewServerApp:
    """The review app for one folder of scored cases. `reviewer` may be empty: the page then asks for it."""

    def __init__(self, inputFolder, reviewer="", server=None):
        self.inputFolder = Path(str(inputFolder))
        self.server = get_server(server, client_type="vue3")
        self.server.enable_module(trameSlicerModule)
        self.slicerApp = SlicerApp()
        slicer.mrmlScene = self.slicerApp.scene  # the bridge's default scene
        register_rca_factories(self.slicerApp.view_manager, self.server, rca_encoder="png")
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout(
            LAYOUT_ID, Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view()])
        )
        self.layoutManager.set_layout(LAYOUT_ID)
        self.editor = self.slicerApp.segmentation_editor
        self.undoStack = UndoStack(undo_limit=50)
        self.editor.set_undo_stack(self.undoStack)
        self.undoStack.can_undo_changed.connect(self._onUndoChanged)
        self.review = ReviewController(scene=self.slicerApp.scene)
        self.currentSlice = None
        self._table = []
        self._threshold = None
        self._openError = ""
        state = self.state
        state.trame__title = "AnomalyFlag review"
        state.update({
            "reviewer": str(reviewer or "").strip(), "errorText": "", "infoText": "", "caseText": "",
            "progressText": "", "queueItems": [], "currentSlice": -1, "viewText": "", "chartSvg": "",
            "editing": False, "effect": "", "canUndo": False, "note": "", "reviewOpen": False,
            "canPrevious": False, "canNext": False, "labelText": "", "openError": "",
        })  # fmt: skip
        self.server.trigger("anomalyflag_key")(self.onKey)
        self._buildUi()

    @property
    def state(self):
        return self.server.state

    @property
    def sliceView(self):
        views = self.slicerApp.view_manager.get_slice_views()
        return views[0] if views else None

    # ------------------------------------------------------------------ loading

    @_guarded
    def start(self):
        """Load the first case of the folder and open its review when the reviewer is known."""
        self._whileOpening(lambda: self.review.loadReviewFolder(self.inputFolder, reviewer=self.state.reviewer or None))

    def _whileOpening(self, step):
        """Run a step that loads a case or opens its review; why the review could not be opened stays in the
        page (openError) until a review is open."""
        self._openError = ""
        try:
            step()
        except (AnomalyFlagError, OSError) as exc:
            self._openError = str(exc)
            raise
        finally:
            self._showCase()

    def _showCase(self):
        """Put the loaded case in the slice view and go to its first pending flagged slice."""
        self.currentSlice = None
        self._table, self._threshold = [], None
        case = self._currentCaseName()
        if case:
            summary, self._table = read_scored_case(self.inputFolder, case)
            self._threshold = summary.get("threshold")
        loaded = self.review.loadedCase
        volume = self.review.reviewCase.get("volume") or loaded.get("volume")
        view = self.sliceView
        if volume is None or view is None:
            return
        view.set_background_volume_id(volume.GetID())
        heatmap = loaded.get("heatmap")
        if heatmap is not None:
            view.set_foreground_volume_id(heatmap.GetID())
        view.fit_view_to_content()
        if self.review.reviewSession is not None:
            pending = self.review.nextPendingSlice()
            queue = self.review.reviewQueue()
            first = pending if pending is not None else (queue[0]["slice"] if queue else None)
            if first is not None:
                self._goToSlice(first)

    def _currentCaseName(self):
        case = self.review.reviewCase.get("case")
        if case:
            return case
        rows, index = self.review.worklistRows, self.review.worklistIndex
        return rows[index]["case"] if 0 <= index < len(rows) else ""

    def _goToSlice(self, sliceIndex):
        self.review.jumpToReviewSlice(int(sliceIndex), sliceNodes=[self.sliceView.get_view_node()])
        self.currentSlice = int(sliceIndex)

    def viewSliceIndex(self):
        """(slice index, RAS centre) the slice view shows now, read back from its slice node."""
        volume = self.review.reviewCase.get("volume") or self.review.loadedCase.get("volume")
        view = self.sliceView
        if volume is None or view is None:
            return None, None
        sliceToRAS = arrayFromVTKMatrix(view.get_view_node().GetSliceToRAS())
        centre = sliceToRAS[:3, 3]
        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        rasToIJK = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(ijkToRAS, rasToIJK)
        ijk = arrayFromVTKMatrix(rasToIJK) @ [*centre, 1.0]
        _geometry, frame = sliceFrame(volume)
        return int(round(ijk[frame.slice_ijk_axis])), tuple(float(c) for c in centre)

    # ------------------------------------------------------------------ actions of the page

    @_guarded
    def openReview(self):
        """Open the current case's review under the reviewer's name typed in the page."""
        case = self._currentCaseName()
        folder = self.review.worklistFolder or self.inputFolder
        self._whileOpening(lambda: self.review.openReview(folder, case, self.state.reviewer))

    @_guarded
    def selectSlice(self, sliceIndex):
        if self.state.editing:
            raise AnomalyFlagError(_("Finish or cancel the recontouring first."))
        self._goToSlice(sliceIndex)

    def _requireSlice(self):
        session = self.review.reviewSession
        if session is None or session.closed:
            raise AnomalyFlagError(_("No review is open; open a case first."))
        if self.currentSlice is None:
            raise AnomalyFlagError(_("Select a flagged slice first."))
        if self.state.editing:
            raise AnomalyFlagError(_("Finish or cancel the recontouring first."))
        return self.currentSlice

    def _decide(self, decision):
        """Record `decision` (a ReviewController method) for the current slice with the note, then move on
        to the next pending slice."""
        decision(self._requireSlice(), note=self.state.note)
        self.state.note = ""
        self._afterDecision()

    def _afterDecision(self):
        pending = self.review.nextPendingSlice()
        if pending is not None:
            self._goToSlice(pending)

    @_guarded
    def accept(self):
        self._decide(self.review.acceptSlice)

    @_guarded
    def skip(self):
        self._decide(self.review.skipSlice)

    @_guarded
    def abnormal(self):
        self._decide(self.review.confirmAbnormal)

    @_guarded
    def undoDecision(self):
        if self.state.editing:
            raise AnomalyFlagError(_("Finish or cancel the recontouring first."))
        removed = self.review.undoLastDecision()
        if removed is not None:
            self._goToSlice(removed["slice"])

    @_guarded
    def recontour(self):
        """Open the segmentation editor on the current slice with the reviewed segment selected."""
        sliceIndex = self._requireSlice()
        target = self.review.startRecontour(sliceIndex)
        case = self.review.reviewCase
        self.undoStack.clear()
        self.editor.set_active_segmentation(case["segmentation"], case["volume"])
        self.editor.set_active_segment_id(target["segmentID"])
        self.undoStack.clear()
        self.editor.set_active_effect_type(SegmentationEffectPaint)
        jumpToPoint(target["sliceRAS"], sliceNodes=[self.sliceView.get_view_node()])
        self.state.editing = True
        self.state.effect = "paint"

    def _requireEditing(self):
        if not self.state.editing:
            raise AnomalyFlagError(_("Press Recontour on a flagged slice first."))

    @_guarded
    def paint(self):
        self._requireEditing()
        self.editor.set_active_effect_type(SegmentationEffectPaint)
        self.state.effect = "paint"

    @_guarded
    def erase(self):
        self._requireEditing()
        self.editor.set_active_effect_type(SegmentationEffectErase)
        self.state.effect = "erase"

    @_guarded
    def undoEdit(self):
        self._requireEditing()
        if self.undoStack.can_undo():
            self.undoStack.undo()

    @_guarded
    def finishRecontour(self):
        """Save the edited segmentation as a new label version and record the decision with its change."""
        self._requireEditing()
        self.editor.deactivate_effect()
        record = self.review.finishRecontour(self.currentSlice, note=self.state.note)
        self.state.editing = False
        self.state.effect = ""
        self.state.note = ""
        self.state.infoText = _("Saved {label} (Dice {dice}, {voxels} voxels changed).").format(
            label=record.get("label"), dice=f"{record['change']['dice']:.3f}", voxels=record["change"]["changed_voxels"]
        )
        self.undoStack.clear()
        self._afterDecision()

    @_guarded
    def cancelRecontour(self):
        """Leave the editor, undoing the edits of this recontouring; no decision is recorded."""
        self._requireEditing()
        self.editor.deactivate_effect()
        while self.undoStack.can_undo():
            self.undoStack.undo()
        self.undoStack.clear()
        self.state.editing = False
        self.state.effect = ""

    @_guarded
    def nextCase(self):
        if self.state.editing:
            raise AnomalyFlagError(_("Finish or cancel the recontouring first."))
        self._showCaseAfter(self.review.nextCase)

    @_guarded
    def previousCase(self):
        if self.state.editing:
            raise AnomalyFlagError(_("Finish or cancel the recontouring first."))
        self._showCaseAfter(self.review.previousCase)

    def _showCaseAfter(self, move):
        self._whileOpening(move)

    def onKey(self, key):
        """A key pressed in the page (outside text fields)."""
        action = REVIEW_KEYS.get(str(key).lower())
        if action is not None:
            getattr(self, action)()

    def _onUndoChanged(self, *_args):
        with self.state:
            self.state.canUndo = self.undoStack.can_undo()

    # ------------------------------------------------------------------ state for the page

    def _refresh(self):
        state = self.state
        review = self.review
        session = review.reviewSession
        state.reviewOpen = session is not None and not session.closed
        state.openError = "" if state.reviewOpen else self._openError
        state.caseText = review.caseText()
        state.progressText = review.reviewProgressText() if state.reviewOpen else ""
        rows, index = review.worklistRows, review.worklistIndex
        state.canPrevious = index > 0
        state.canNext = 0 <= index < len(rows) - 1
        queue = review.reviewQueue() if state.reviewOpen else []
        state.queueItems = [
            {"slice": item["slice"], "score": "?" if item["score"] is None else f"{float(item['score']):.2f}",
             "decision": _decisionText(item["decision"]), "decisionKey": item["decision"] or "pending",
             "color": DECISION_COLORS.get(item["decision"], DECISION_COLORS[None]),
             "change": (_("Dice {dice}, {voxels} voxels changed").format(dice=f"{item['change']['dice']:.3f}",
                                                                         voxels=item["change"]["changed_voxels"])
                        if item.get("change") else ""),
             "label": item.get("label") or "", "note": item.get("note") or ""}
            for item in queue
        ]  # fmt: skip
        state.currentSlice = -1 if self.currentSlice is None else self.currentSlice
        state.chartSvg = scoreChartSvg(self._table, self._threshold, queue, self.currentSlice) if self._table else ""
        viewSlice, centre = self.viewSliceIndex()
        state.viewText = (
            _("View: slice {index}, centred at R {r:.1f} A {a:.1f} S {s:.1f}").format(
                index=viewSlice, r=centre[0], a=centre[1], s=centre[2]
            )
            if centre is not None
            else ""
        )
        case = self._currentCaseName()
        latest = latest_version(review.worklistFolder or self.inputFolder, case) if case else None
        state.labelText = _("Label version: {name}").format(name=latest.name) if latest else ""
        state.canUndo = self.undoStack.can_undo()

    # ------------------------------------------------------------------ the page

    def _buildUi(self):
        with SinglePageLayout(self.server) as layout:
            layout.title.set_text("AnomalyFlag review")
            client.ClientTriggers(mounted=KEY_LISTENER)
            with layout.toolbar:
                v3.VSpacer()
                html.Span("{{ caseText }}", classes="mx-3", id="case-text")
                html.Span("{{ progressText }}", classes="mx-3 font-weight-bold", id="progress-text")
                v3.VBtn(_("Previous case"), click=self.previousCase, disabled=("!canPrevious || editing",),
                        id="previous-case", variant="tonal", classes="mx-1")  # fmt: skip
                v3.VBtn(_("Next case"), click=self.nextCase, disabled=("!canNext || editing",),
                        id="next-case", variant="tonal", classes="mx-1")  # fmt: skip
            with layout.content:
                with html.Div(style="display: flex; flex-direction: row; height: calc(100vh - 64px);"):
                    with html.Div(style="flex: 1 1 auto; min-width: 0; display: flex; flex-direction: column;"):
                        self._buildMessages()
                        with html.Div(style="flex: 1 1 auto; position: relative; min-height: 0;",
                                      id="slice-view"):  # fmt: skip
                            self.layoutManager.initialize_layout_grid(layout)
                        html.Div("{{ viewText }}", classes="text-caption px-2", id="view-text")
                    with html.Div(style=SIDE_PANEL_STYLE, classes="bg-grey-lighten-4"):
                        self._buildSidePanel()

    def _buildMessages(self):
        fixed = "flex: 0 0 auto;"
        v3.VAlert(v_if="errorText && errorText !== openError", text=("errorText",), type="error", density="compact",
                  closable=True, id="error-text", classes="ma-1", style=fixed)  # fmt: skip
        v3.VAlert(v_if="openError", text=("openError",), type="warning", density="compact", id="open-error",
                  title=_("The review of this case is not open"), classes="ma-1", style=fixed)  # fmt: skip
        v3.VAlert(v_if="infoText && !errorText", text=("infoText",), type="success", density="compact",
                  id="info-text", classes="ma-1", style=fixed)  # fmt: skip

    def _buildSidePanel(self):
        with html.Div(v_if="!reviewOpen", classes="mb-2"):
            v3.VTextField(v_model=("reviewer",), label=_("Reviewer"), density="compact", hide_details=True,
                          id="reviewer-field")  # fmt: skip
            v3.VBtn(_("Open review"), click=self.openReview, classes="mt-1", id="open-review")
        html.Div(v_html=("chartSvg",), id="chart")
        html.Div("{{ labelText }}", classes="text-caption", id="label-text")
        with html.Div(v_if="reviewOpen && !editing", classes="my-2"):
            v3.VTextField(v_model=("note",), label=_("Note (optional)"), density="compact", hide_details=True)
            with html.Div(classes="mt-1"):
                for label, action, testId in (
                    (_("Accept (A)"), self.accept, "accept"),
                    (_("Skip (S)"), self.skip, "skip"),
                    (_("Recontour (R)"), self.recontour, "recontour"),
                    (_("Abnormal (X)"), self.abnormal, "abnormal"),
                ):
                    v3.VBtn(label, click=action, size="small", classes="mr-1 mb-1", id=testId,
                            disabled=("currentSlice < 0",))  # fmt: skip
                v3.VBtn(_("Undo decision"), click=self.undoDecision, size="small", variant="text",
                        classes="mb-1", id="undo-decision")  # fmt: skip
        with v3.VCard(v_if="editing", classes="my-2 pa-2", id="editor-panel"):
            html.Div(_("Segmentation editor: slice {{ currentSlice }}"), classes="text-subtitle-2")
            v3.VBtn(_("Paint"), click=self.paint, size="small", classes="mr-1",
                    color=("effect === 'paint' ? 'primary' : undefined",), id="paint")  # fmt: skip
            v3.VBtn(_("Erase"), click=self.erase, size="small", classes="mr-1",
                    color=("effect === 'erase' ? 'primary' : undefined",), id="erase")  # fmt: skip
            v3.VBtn(_("Undo"), click=self.undoEdit, size="small", classes="mr-1", disabled=("!canUndo",),
                    id="undo-edit")  # fmt: skip
            with html.Div(classes="mt-2"):
                v3.VBtn(_("Finish"), click=self.finishRecontour, size="small", color="success", classes="mr-1",
                        id="finish")  # fmt: skip
                v3.VBtn(_("Cancel"), click=self.cancelRecontour, size="small", id="cancel-recontour")
        with v3.VList(density="compact", id="slice-list", bg_color="transparent"):
            with v3.VListItem(v_for="item in queueItems", key="item.slice",
                              click=(self.selectSlice, "[item.slice]"),
                              active=("item.slice === currentSlice",),
                              id=("`slice-${item.slice}`",)):  # fmt: skip
                html.Span("{{ item.slice }}", classes="font-weight-bold mr-2")
                html.Span(_("score") + " {{ item.score }}", classes="mr-2")
                html.Span("{{ item.decision }}", style=("`color: ${item.color}`",), classes="mr-2",
                          id=("`decision-${item.slice}`",))  # fmt: skip
                html.Div("{{ item.change }} {{ item.label }}", v_if="item.change || item.label",
                         classes="text-caption")  # fmt: skip


def startServer(inputFolder, reviewer="", port=8080, host="localhost"):
    """Build the app on `inputFolder` and serve it (blocking)."""
    app = ReviewServerApp(inputFolder, reviewer)
    app.server.controller.on_server_ready.add(lambda **_kwargs: app.start())
    try:
        app.server.start(port=int(port), host=host, open_browser=False, timeout=0)
    finally:
        app.review.closeReview()
    return app
