"""The review and worklist loop of the Slicer module, without Qt: the worklist, the case loaded from it, the open
review session, its decisions and recontouring. The module's Logic holds one (``logic.review``); the panel's
Review section (AnomalyFlagWidgets.reviewSection) shows its state and calls it.

One case at a time: openReview() starts or resumes the review session of a scored case (the sidecar
<case>_review.json next to its outputs, see AnomalyFlagLib.review.session); acceptSlice(), skipSlice() and
startRecontour()/finishRecontour() record decisions, each saved to the sidecar before returning and mirrored
in the decisions table node. loadWorklist()/nextCase()/previousCase() walk a worklist folder (worklist.csv
from `anomalyflag worklist`). Errors are the library's SessionError/InputError; after an error nothing
already recorded has changed.

Example, in Slicer's Python console::

    review = slicer.util.getModuleLogic("AnomalyFlag").review
    case = review.loadWorklist("/data/scores", reviewer="Dr Ann")  # loads and opens the top case
    for item in review.reviewQueue():
        print(item["slice"], item["score"], item["decision"])
    review.acceptSlice(12)
    target = review.startRecontour(14)  # then edit the segment in the Segment Editor
    review.finishRecontour(14, note="liver dome")  # saves <case>_seg_v1.seg.nrrd
    print(review.reviewProgressText())
    review.nextCase()
"""

import json
import logging
from pathlib import Path

import numpy as np
from AnomalyFlagLib.errors import AnomalyFlagError, InputError, SessionError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.io.scored_case import CaseFiles, read_scored_case, scored_cases
from AnomalyFlagLib.review.active_learning import WORKLIST_NAME, read_worklist
from AnomalyFlagLib.review.session import ReviewSession

from .i18n import tr as _
from .navigation import jumpToSlice
from .review import (
    decisionsToTableNode,
    findOriginalSegmentation,
    imageFingerprintOfVolumeNode,
    loadReviewCase,
    recontourTarget,
    removeReviewCase,
    requireSegmentationOnVolumeGrid,
    saveEditedSegmentationVersion,
    segmentLabelmapArray,
    sliceChangeFromSegmentations,
)
from .segmentation import findSegmentId, requireSegmentId
from .volumes import geometryFromVolumeNode


class ReviewController:
    """State of the review loop. `scene` (default: slicer.mrmlScene) is where worklist cases are loaded."""

    def __init__(self, scene=None) -> None:
        self.scene = scene
        self.reviewer = ""
        self.preferredSegmentName = ""
        self.decisionsTableNode = None
        self._review = None  # the open review: session, case, nodes, pending recontours
        self._worklist = None  # {"folder", "rows", "index"}
        self._loadedCase = None  # what loadReviewCase put into the scene for the current worklist case

    # ------------------------------------------------------------------ the open review

    def _requireReview(self):
        if self._review is None or self._review["session"].closed:
            raise SessionError(_("No review is open; open a case first."))
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
        before, else the first segment."""
        if segmentationNode is None:
            return None
        if segmentId:
            return requireSegmentId(segmentationNode, segmentId)
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise InputError(
                _("Segmentation '{name}' has no segments to review.").format(name=segmentationNode.GetName())
            )
        preferred = findSegmentId(segmentationNode, self.preferredSegmentName) if self.preferredSegmentName else None
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
        outputFolder = Path(str(outputFolder))
        case = str(case)
        reviewer = str(reviewer or "").strip()
        if not reviewer:
            raise InputError(_("Enter the reviewer's name before opening a review."))
        self.closeReview()
        loaded = self._loadedCase if self._loadedCase and self._loadedCase["case"] == case else None
        if volumeNode is None and loaded is not None:
            volumeNode = loaded["volume"]
            segmentationNode = segmentationNode or loaded["segmentation"]
        heatmapNode = loaded["heatmap"] if loaded is not None and volumeNode is loaded["volume"] else None
        summary, _table = read_scored_case(outputFolder, case)
        imageFingerprint = imagePath = None
        if volumeNode is not None:
            geometry = geometryFromVolumeNode(volumeNode)
            scored = Geometry.from_dict(summary["geometry"])
            if not geometry.matches(scored):
                raise InputError(
                    _("Volume '{name}' ({grid}) is not the image case '{case}' was scored on ({scored}).").format(
                        name=volumeNode.GetName(), grid=geometry.describe(), case=case, scored=scored.describe()
                    )
                )
            imageFingerprint = imageFingerprintOfVolumeNode(volumeNode)
            imagePath = _storedFileName(volumeNode)
        if loaded is not None and not imagePath:
            imagePath = loaded.get("imagePath")
        segmentId = self._chooseSegmentId(segmentationNode, segmentId)
        segmentationPath = None
        if segmentationNode is not None:
            if volumeNode is None:
                raise InputError(_("A segmentation can only be reviewed together with its volume."))
            requireSegmentationOnVolumeGrid(segmentationNode, volumeNode)
            if loaded is not None and segmentationNode is loaded["segmentation"]:
                segmentationPath = loaded.get("segmentationPath")
            else:
                segmentationPath = _storedFileName(segmentationNode)
        session = ReviewSession.open(outputFolder, case, reviewer, model_fingerprint=summary.get("model_fingerprint"),
                                     image_fingerprint=imageFingerprint, order=order, image_path=imagePath,
                                     segmentation_path=segmentationPath)  # fmt: skip
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
        table = decisionsToTableNode(review["session"], table, scene=self.scene)
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
        anomalyFraction, decision ("accepted", "recontoured", "skipped", "abnormal" or None), note, change,
        label."""
        session = self._requireReview()["session"]
        decided = session.decisions
        out = []
        for item in session.queue:
            record = decided.get(int(item["slice"])) or {}
            out.append({"slice": int(item["slice"]), "score": item.get("normalised"),
                        "anomalyFraction": item.get("anomaly_fraction"), "decision": record.get("decision"),
                        "note": record.get("note", ""), "change": record.get("change"),
                        "label": record.get("label")})  # fmt: skip
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

    def caseText(self) -> str:
        """'case_017 (2 of 9)': the case under review or loaded from the worklist; 'No case loaded.' otherwise."""
        rows, index = self.worklistRows, self.worklistIndex
        case = self.reviewCase.get("case") or (rows[index]["case"] if 0 <= index < len(rows) else "")
        if not case:
            return _("No case loaded.")
        return _("{case} ({index} of {count})").format(case=case, index=index + 1, count=len(rows))

    @staticmethod
    def queueItemText(item) -> str:
        """One line of the review list for a reviewQueue() item: slice, score, decision, the change made."""
        decisions = {"accepted": _("accepted"), "recontoured": _("recontoured"), "skipped": _("skipped"),
                     "abnormal": _("confirmed abnormal")}  # fmt: skip
        score = item["score"]
        text = _("Slice {index}    score {score}    {decision}").format(
            index=item["slice"], score="?" if score is None else f"{float(score):.2f}",
            decision=decisions.get(item["decision"], _("pending")))  # fmt: skip
        change = item.get("change")
        if change:
            text += "    " + _("Dice {dice}, {voxels} voxels changed").format(
                dice=f"{change['dice']:.3f}", voxels=change["changed_voxels"]
            )
        return text

    def nextPendingSlice(self):
        """The first undecided slice in review order, or None when the review is complete."""
        item = self._requireReview()["session"].next_pending()
        return None if item is None else int(item["slice"])

    def jumpToReviewSlice(self, sliceIndex, sliceNodes=None):
        """Centre the slice views on the hottest region of `sliceIndex` of the case under review."""
        review = self._requireReview()
        if review["volume"] is None:
            raise InputError(_("The review has no volume to show."))
        return jumpToSlice(review["volume"], review["heatmap"], int(sliceIndex), sliceNodes=sliceNodes)

    # ------------------------------------------------------------------ decisions

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

    def confirmAbnormal(self, sliceIndex, note="") -> dict:
        """Record that `sliceIndex` shows an abnormality (the flag was right); returns the decision record."""
        return self._decide(sliceIndex, "abnormal", note)

    def undoLastDecision(self):
        """Withdraw the most recent decision of the open review; returns it, or None."""
        removed = self._requireReview()["session"].undo_last()
        self._updateDecisionsTable()
        return removed

    def startRecontour(self, sliceIndex) -> dict:
        """Prepare recontouring `sliceIndex`: returns the recontour target (segmentation node ID, segment ID
        and name, source volume node ID, slice, RAS point of the hottest region; see
        AnomalyFlagMRML.review.recontourTarget) and remembers the segment's original labelmap, against
        which finishRecontour() measures the change. The GUI opens the Segment Editor on this target."""
        review = self._requireReview()
        if review["segmentation"] is None or not review["segmentId"]:
            raise InputError(
                _("Case '{case}' has no segmentation in the review; load or select one to recontour.").format(
                    case=review["case"]
                )
            )
        sliceIndex = int(sliceIndex)
        if sliceIndex not in {int(q["slice"]) for q in review["session"].queue}:
            raise InputError(
                _("Slice {index} of case '{case}' is not a flagged slice of this review.").format(
                    index=sliceIndex, case=review["case"]
                )
            )
        volume = review["volume"]
        target = recontourTarget(review["segmentation"], review["segmentId"], volume, sliceIndex, review["heatmap"])
        if sliceIndex not in review["recontouring"]:
            original = review["original"]
            if original is not None and original.GetScene() is not None:
                found = findSegmentId(original, review["segmentId"]) or findSegmentId(original, target["segmentName"])
                mask = (segmentLabelmapArray(original, found, volume) if found
                        else np.zeros(volume.GetImageData().GetDimensions()[::-1], dtype=bool))  # fmt: skip
            else:
                mask = segmentLabelmapArray(review["segmentation"], review["segmentId"], volume)
            review["recontouring"][sliceIndex] = mask
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
        sliceIndex = int(sliceIndex)
        if sliceIndex not in review["recontouring"]:
            raise InputError(
                _("Slice {index} is not being recontoured; press Recontour on it first.").format(index=sliceIndex)
            )
        change = sliceChangeFromSegmentations(review["recontouring"][sliceIndex], review["segmentation"],
                                              review["segmentId"], review["volume"], sliceIndex)  # fmt: skip
        path = saveEditedSegmentationVersion(review["segmentation"], review["outputFolder"], review["case"],
                                             review["volume"])  # fmt: skip
        try:
            record = self._decide(sliceIndex, "recontoured", note, change=change, labelPath=path)
        except AnomalyFlagError as exc:
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
    def loadedCase(self) -> dict:
        """The case loaded from the worklist: dict(case, volume, heatmap, segmentation), or {} (also while its
        review could not be opened)."""
        if self._loadedCase is None:
            return {}
        return {k: self._loadedCase.get(k) for k in ("case", "volume", "heatmap", "segmentation")}

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
        if folder is None or str(folder).strip() in ("", "."):
            raise InputError(_("Choose the worklist folder first."))
        folder = Path(str(folder))
        path = folder / WORKLIST_NAME
        if not path.is_file():
            raise InputError(
                _("'{folder}' has no {name}; create it with 'anomalyflag worklist'.").format(
                    folder=folder, name=WORKLIST_NAME
                )
            )
        try:
            rows = read_worklist(path)
        except (OSError, UnicodeDecodeError, KeyError) as exc:
            raise InputError(_("'{path}' cannot be read: {error}").format(path=path, error=exc)) from None
        if not rows or any("case" not in r for r in rows):
            raise InputError(_("'{path}' lists no cases.").format(path=path))
        return self._loadRows(folder, rows, reviewer, index, segmentName)

    def loadReviewFolder(self, folder, reviewer=None, index=0, segmentName=None) -> dict:
        """Like loadWorklist, for any folder of scoring outputs: its worklist.csv when it has one, else its
        scored cases (every <case>_summary.json) in name order."""
        if folder is None or str(folder).strip() in ("", "."):
            raise InputError(_("Choose the folder of scored cases first."))
        folder = Path(str(folder))
        if (folder / WORKLIST_NAME).is_file():
            return self.loadWorklist(folder, reviewer, index, segmentName)
        if not folder.is_dir():
            raise InputError(_("'{folder}' is not a folder.").format(folder=folder))
        cases = scored_cases(folder)
        if not cases:
            raise InputError(
                _(
                    "'{folder}' has no scored cases (no <case>_summary.json); score them with 'anomalyflag score'."
                ).format(folder=folder)
            )
        rows = [{"rank": str(i + 1), "case": case} for i, case in enumerate(cases)]
        return self._loadRows(folder, rows, reviewer, index, segmentName)

    def _loadRows(self, folder, rows, reviewer, index, segmentName):
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
        rows, folder = self._worklist["rows"], self._worklist["folder"]
        index = int(index)
        if not 0 <= index < len(rows):
            raise InputError(_("The worklist has no case number {index}.").format(index=index + 1))
        case = rows[index]["case"]
        imagePath = rows[index].get("case_path") or None
        if not imagePath:
            try:
                summary = json.loads(CaseFiles(folder, case).summary.read_text(encoding="utf-8"))
                imagePath = summary.get("image") or summary.get("source_image")
            except (OSError, ValueError):
                imagePath = None
        segmentationPath = findOriginalSegmentation(imagePath, case)
        loaded = loadReviewCase(folder, case, imagePath, segmentationPath, scene=self.scene)
        loaded["case"] = case
        loaded["imagePath"] = str(imagePath)
        self.closeReview()
        if self._loadedCase is not None:
            removeReviewCase(self._loadedCase, scene=self.scene)
        self._loadedCase = loaded
        self._worklist["index"] = index
        if self.reviewer:
            self.openReview(folder, case, self.reviewer)
        return {"case": case, "index": index, **{k: loaded[k] for k in ("volume", "heatmap", "segmentation")}}

    def unloadCase(self) -> None:
        """Close the review and remove the nodes loaded for the current worklist case."""
        self.closeReview()
        if self._loadedCase is not None:
            removeReviewCase(self._loadedCase, scene=self.scene)
            self._loadedCase = None


def _storedFileName(node):
    """The file a node was loaded from (its storage node's file name), or None."""
    storage = node.GetStorageNode()
    return storage.GetFileName() if storage is not None and storage.GetFileName() else None
