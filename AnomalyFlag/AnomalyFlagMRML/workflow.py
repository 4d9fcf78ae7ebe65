"""The Qt-free workflow the module's Logic delegates to: score arrays (any thread), publish results as
nodes (main thread), score a volume node synchronously, and score a folder like `anomalyflag score`
plus PNG snapshots of the flagged slices."""

import logging
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
from AnomalyFlagLib.errors import InputError

from .constants import ATTR_CASE, ATTR_SCALE, CHART_REFERENCE, SCORE_TABLE_REFERENCE, SEGMENTATION_REFERENCE
from .heatmap import createHeatmapNode, showHeatmap
from .scene import nodeIds, removeNodesAddedSince
from .scoreTable import createScoreChart, createScoreTable
from .segmentation import loadSegmentation, roiMaskFromSegmentation, showSegmentationOutlines
from .snapshot import renderSliceSnapshot
from .volumes import arrayAndGeometryFromVolumeNode, copyVolumeGeometry, updateVolumeNodeFromArray

_scorerLock = threading.Lock()
_scorerCache = {}


def getScorer(modelPath, device="auto", batchSize=None):
    """A loaded Scorer, cached for the last (bundle, device, batch size) so repeated runs skip loading."""
    from AnomalyFlagLib.bundle import Bundle
    from AnomalyFlagLib.scoring import Scorer

    if isinstance(modelPath, Bundle):
        return Scorer(modelPath, device=device, batch_size=batchSize)
    if modelPath is None or str(modelPath) == "":
        raise InputError("No model bundle selected; choose a model bundle folder.")
    path = Path(modelPath).expanduser()
    try:
        stamp = max((p.stat().st_mtime_ns for p in path.iterdir()), default=0) if path.is_dir() else None
    except OSError:
        stamp = None
    key = (str(path.resolve()), stamp, str(device), batchSize)
    with _scorerLock:
        scorer = _scorerCache.get(key) if stamp is not None else None
        if scorer is None:
            scorer = Scorer(path, device=device, batch_size=batchSize)
            _scorerCache.clear()
            _scorerCache[key] = scorer
        return scorer


def computeScores(array, geometry, modelPath, roiMask=None, device="auto", batchSize=None, roiMarginMm=10.0,
                  name="volume", progress=None, cancel=None):  # fmt: skip
    """Score a (k, j, i) array with its Geometry; touches no MRML, safe in a worker thread."""
    scorer = getScorer(modelPath, device, batchSize)
    return scorer.score(
        np.asarray(array),
        geometry=geometry,
        roi=roiMask,
        roi_margin_mm=roiMarginMm,
        name=name,
        progress=progress,
        cancel=cancel,
    )


def publishResult(result, inputVolumeNode, segmentationNode=None, thresholdOverride=None, heatmapNode=None,
                  tableNode=None, chartNode=None, opacity=0.5):  # fmt: skip
    """Create or update the heatmap, table and chart nodes of `result` and show them (main thread).

    A threshold override re-flags the slices (`result.with_threshold`). If anything fails, the nodes
    created here are removed again. Returns dict(heatmap=..., table=..., chart=..., result=...).
    """
    if inputVolumeNode is None or inputVolumeNode.GetScene() is None:
        raise InputError("No input volume (in a scene) to publish the result on.")
    scene = inputVolumeNode.GetScene()
    if thresholdOverride is not None:
        result = result.with_threshold(float(thresholdOverride))
    before = nodeIds(scene)
    try:
        heat = createHeatmapNode(result, inputVolumeNode, heatmapNode, scene=scene)
        table = createScoreTable(result, tableNode, scene=scene)
        chart = createScoreChart(table, result.threshold, chartNode, scene=scene)
        heat.SetNodeReferenceID(SCORE_TABLE_REFERENCE, table.GetID())
        heat.SetNodeReferenceID(CHART_REFERENCE, chart.GetID())
        if segmentationNode is not None:
            heat.SetNodeReferenceID(SEGMENTATION_REFERENCE, segmentationNode.GetID())
        showHeatmap(heat, inputVolumeNode, opacity=opacity)
        showSegmentationOutlines(segmentationNode)
    except BaseException:
        removeNodesAddedSince(scene, before)
        raise
    flagged = result.flagged_indices
    logging.info("AnomalyFlag: %s: %d of %d slices flagged%s", result.name, len(flagged), len(result.slices),
                 (": " + ", ".join(map(str, flagged))) if flagged else "")  # fmt: skip
    return {"heatmap": heat, "table": table, "chart": chart, "result": result}


def scoreVolumeNode(inputVolumeNode, modelPath, segmentationNode=None, segmentIds=None, device="auto",
                    batchSize=None, thresholdOverride=None, progress=None, cancel=None, roiMarginMm=10.0,
                    useSegmentationAsRoi=True):  # fmt: skip
    """Read the node, score it and publish the result, synchronously (for the Python console).

    With a segmentation, `segmentIds` (None: all segments) restrict flags and heatmap to those segments
    plus `roiMarginMm`, unless `useSegmentationAsRoi` is False (then it is only shown as outlines).
    On cancel or error the scene is left unchanged.
    """
    array, geometry = arrayAndGeometryFromVolumeNode(inputVolumeNode)
    roi = None
    if segmentationNode is not None and useSegmentationAsRoi:
        roi = roiMaskFromSegmentation(segmentationNode, segmentIds, inputVolumeNode)
    result = computeScores(array, geometry, modelPath, roi, device, batchSize, roiMarginMm,
                           name=inputVolumeNode.GetName(), progress=progress, cancel=cancel)  # fmt: skip
    return publishResult(result, inputVolumeNode, segmentationNode, thresholdOverride)


def _caseSnapshots(scene, case, result, outputs, roiPath, size):
    """Load a scored case into `scene`, stage one PNG per flagged slice in `outputs` (a CaseOutputs),
    then remove what was loaded. The volume is loaded whole: the slice views render from a node."""
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagLib.io.volumes import read_image

    before = nodeIds(scene)
    try:
        image = read_image(case.image, f"volume '{case.image}'")
        geometry = Geometry.from_image(image)
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case.name)
        updateVolumeNodeFromArray(volume, sitk.GetArrayViewFromImage(image), geometry)
        del image
        heat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case.name} anomaly heatmap")
        heatArray = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs.path("heatmap"))))
        updateVolumeNodeFromArray(heat, heatArray.astype(np.uint8), geometry)
        copyVolumeGeometry(volume, heat)
        heat.SetAttribute(ATTR_SCALE, repr(float(result.heatmap_scale)))
        heat.SetAttribute(ATTR_CASE, case.name)
        segmentationNode = (
            loadSegmentation(roiPath, scene, referenceVolumeNode=volume, geometry=geometry) if roiPath else None
        )
        normalised = result.slices["normalised"]
        for index in result.flagged_indices:
            path = outputs.image_path(outputs.files.snapshot(index).name)
            renderSliceSnapshot(volume, heat, segmentationNode, index, path, size=size, score=float(normalised[index]))
    finally:
        removeNodesAddedSince(scene, before)


def scoreFolder(modelPath, inputFolder, outputFolder, device="auto", batchSize=None, snapshots=True, progress=None,
                cancel=None, roiFolder=None, roiLabels=None, roiMarginMm=10.0, snapshotSize=512, log=None):  # fmt: skip
    """Score every case under `inputFolder` and write the same files as `anomalyflag score` (slice CSV,
    heatmap NRRD, summary JSON per case) into `outputFolder`, plus `<case>_slice<index>.png` for each
    flagged slice when `snapshots`. `roiFolder` (a file for one case, or a folder of <case>.seg.nrrd /
    <case>_seg.* / <case>_organs.* files, as `--roi`) restricts scoring and gives the snapshot outlines.

    Returns one summary per case: the library's summary plus "files" and "snapshots", or
    {"case", "error"} for a case that could not be scored. `progress(done, total)` counts per mille of
    the whole folder; `cancel()` stops with CancelledError (finished cases keep their files).
    """
    from AnomalyFlagLib.io.cases import discover_cases
    from AnomalyFlagLib.io.scored_case import ScoreOptions, score_cases

    log = log or logging.info
    cases = discover_cases(inputFolder, "input")
    scorer = getScorer(modelPath, device, batchSize)
    scene = slicer.mrmlScene if snapshots and slicer.mrmlScene is not None else None
    if snapshots and scene is None:
        scene = slicer.vtkMRMLScene()
    total = 1000 * len(cases)

    def caseProgress(ci, case):
        def report(done, count):
            if progress is not None:
                progress(1000 * ci + int(900 * done / max(count, 1)), total)

        return report

    def caseSnapshots(case, result, outputs, roiPath):
        _caseSnapshots(scene, case, result, outputs, roiPath, snapshotSize)

    options = ScoreOptions(roi=roiFolder, roi_labels=roiLabels, roi_margin_mm=roiMarginMm)
    summaries = []
    outcomes = score_cases(scorer, cases, outputFolder, options, caseSnapshots if snapshots else None,
                           caseProgress, cancel)  # fmt: skip
    for ci, outcome in enumerate(outcomes):
        case, result = outcome.case, outcome.result
        if outcome.error is not None:
            summary = {"case": case.name, "error": str(outcome.error)}
            log(f"{case.name}: FAILED: {outcome.error}")
        else:
            summary = dict(outcome.summary, snapshots=outcome.images)
            flagged = result.flagged_indices
            log(f"{case.name}: {len(flagged)} of {len(result.slices)} slices flagged"
                f"{': ' + ', '.join(map(str, flagged)) if flagged else ''}")  # fmt: skip
            if result.scan_level > 0:
                log(f"{case.name}: {result.level_text()}")
            if result.warnings:
                log(f"{case.name}: WARNING: {result.warning_text()}")
        summaries.append(summary)
        if progress is not None:
            progress(1000 * (ci + 1), total)
    return summaries
