"""Per-slice scores as a table node (one row per slice, the columns of the result's slice table)
and a plot chart: normalised score per slice, the threshold line and the flagged slices as markers."""

import math

import numpy as np
import slicer
import vtk
from AnomalyFlagLib.errors import InputError

from .constants import (
    ATTR_CASE,
    ATTR_MODEL,
    ATTR_ROLE,
    ATTR_SERIES,
    ATTR_THRESHOLD,
    CHART_DATA_REFERENCE,
    ROLE_CHART,
    ROLE_CHART_DATA,
    ROLE_SCORES,
    SCORE_TABLE_REFERENCE,
)

INT_COLUMNS = ("index", "score_from")
BOOL_COLUMNS = ("flagged", "in_roi")
STRING_COLUMNS = ("score_kind",)
COLUMN_UNITS = {"z_mm": "mm"}


def _newArray(column: str):
    if column in INT_COLUMNS:
        array = vtk.vtkIntArray()
    elif column in BOOL_COLUMNS:
        array = vtk.vtkBitArray()
    elif column in STRING_COLUMNS:
        array = vtk.vtkStringArray()
    else:
        array = vtk.vtkDoubleArray()
    array.SetName(column)
    return array


def createScoreTable(result, tableNode=None, scene=None):
    """Table node with one row per slice of `result` (a CaseResult), with its typed columns and their
    descriptions (a backend's score components included)."""
    scene = scene or slicer.mrmlScene
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{result.name} slice scores")
    table = vtk.vtkTable()
    n = len(result.slices)
    for column in result.slices.names:
        values = np.asarray(result.slices[column])
        array = _newArray(column)
        array.SetNumberOfTuples(n)
        for row in range(n):
            value = values[row]
            if column in BOOL_COLUMNS:
                array.SetValue(row, int(bool(value)))
            elif column in INT_COLUMNS:
                array.SetValue(row, int(value))
            elif column in STRING_COLUMNS:
                array.SetValue(row, str(value))
            else:
                array.SetValue(row, float(value))
        table.AddColumn(array)
    wasModifying = tableNode.StartModify()
    try:
        tableNode.SetAndObserveTable(table)
        for column in result.slices.names:
            if column in COLUMN_UNITS:
                tableNode.SetColumnUnitLabel(column, COLUMN_UNITS[column])
            tableNode.SetColumnDescription(column, result.slices.descriptions.get(column, ""))
        tableNode.SetAttribute(ATTR_THRESHOLD, repr(float(result.threshold)))
        tableNode.SetAttribute(ATTR_CASE, result.name)
        tableNode.SetAttribute(ATTR_MODEL, result.model_name)
        tableNode.SetAttribute(ATTR_ROLE, ROLE_SCORES)
    finally:
        tableNode.EndModify(wasModifying)
    if tableNode.GetStorageNode() is None:
        tableNode.AddDefaultStorageNode()
    return tableNode


def _columnValues(tableNode, name):
    table = tableNode.GetTable() if tableNode is not None else None
    array = table.GetColumnByName(name) if table is not None else None
    if array is None:
        label = f"table '{tableNode.GetName()}'" if tableNode is not None else "no table"
        raise InputError(f"{label} has no column '{name}'; it is not an AnomalyFlag score table.")
    return [array.GetVariantValue(i).ToDouble() for i in range(array.GetNumberOfTuples())]


def flaggedSlicesFromTable(tableNode):
    """Indices of the flagged slices in an AnomalyFlag score table, in slice order."""
    index = _columnValues(tableNode, "index")
    flagged = _columnValues(tableNode, "flagged")
    return sorted(int(i) for i, f in zip(index, flagged) if f and not math.isnan(f))


def tableThreshold(tableNode):
    value = tableNode.GetAttribute(ATTR_THRESHOLD) if tableNode is not None else None
    return float(value) if value else None


def _chartData(tableNode, threshold, dataNode):
    """Companion table for the chart: index, threshold (constant) and the score of flagged slices (NaN elsewhere)."""
    index = _columnValues(tableNode, "index")
    score = _columnValues(tableNode, "normalised")
    flagged = _columnValues(tableNode, "flagged")
    table = vtk.vtkTable()
    arrays = {}
    for name in ("index", "threshold", "flagged_score"):
        arrays[name] = vtk.vtkDoubleArray()
        arrays[name].SetName(name)
        arrays[name].SetNumberOfTuples(len(index))
        table.AddColumn(arrays[name])
    for row, (i, s, f) in enumerate(zip(index, score, flagged)):
        arrays["index"].SetValue(row, i)
        arrays["threshold"].SetValue(row, float(threshold))
        arrays["flagged_score"].SetValue(row, s if f else float("nan"))
    dataNode.SetAndObserveTable(table)
    dataNode.SetAttribute(ATTR_ROLE, ROLE_CHART_DATA)
    dataNode.SetAttribute(ATTR_THRESHOLD, repr(float(threshold)))
    if dataNode.GetStorageNode() is None:
        dataNode.AddDefaultStorageNode()
    return dataNode


def _seriesByRole(chartNode):
    found = {}
    for i in range(chartNode.GetNumberOfPlotSeriesNodes()):
        series = chartNode.GetNthPlotSeriesNode(i)
        if series is not None and series.GetAttribute(ATTR_SERIES):
            found[series.GetAttribute(ATTR_SERIES)] = series
    return found


def _isOrganAware(tableNode) -> bool:
    """Whether the table's slices inside the segmentation carry the organ-aware score (column score_kind)."""
    array = tableNode.GetTable().GetColumnByName("score_kind") if tableNode.GetTable() is not None else None
    return array is not None and any(array.GetValue(i) == "organ" for i in range(array.GetNumberOfTuples()))


def createScoreChart(tableNode, threshold, chartNode=None, scene=None):
    """Plot chart of normalised score vs slice index, the threshold as a horizontal line and the flagged
    slices as markers. A companion table node (referenced by the chart) holds the threshold/flag columns."""
    scene = scene or tableNode.GetScene() or slicer.mrmlScene
    if threshold is None:
        threshold = tableThreshold(tableNode)
    if threshold is None:
        raise InputError(f"no threshold given and table '{tableNode.GetName()}' does not record one.")
    case = tableNode.GetAttribute(ATTR_CASE) or tableNode.GetName()
    if chartNode is None:
        chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{case} anomaly scores")
    dataNode = chartNode.GetNodeReference(CHART_DATA_REFERENCE)
    if dataNode is None:
        dataNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{case} chart data")
        chartNode.SetNodeReferenceID(CHART_DATA_REFERENCE, dataNode.GetID())
    _chartData(tableNode, threshold, dataNode)
    chartNode.SetNodeReferenceID(SCORE_TABLE_REFERENCE, tableNode.GetID())
    existing = _seriesByRole(chartNode)
    organ = _isOrganAware(tableNode)
    scoreTitle = "normalised score (organ-aware inside the segmentation)" if organ else "normalised score"
    thresholdTitle = f"{'organ-aware ' if organ else ''}threshold {threshold:.3g}"
    specs = (
        ("score", scoreTitle, tableNode, "normalised", (0.1, 0.35, 0.8), True, False),
        ("threshold", thresholdTitle, dataNode, "threshold", (0.85, 0.1, 0.1), True, False),
        ("flagged", "flagged slices", dataNode, "flagged_score", (1.0, 0.5, 0.0), False, True),
    )
    for role, title, source, yColumn, color, line, markers in specs:
        series = existing.get(role)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{case} {title}")
            series.SetAttribute(ATTR_SERIES, role)
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        else:
            series.SetName(f"{case} {title}")
        series.SetAndObserveTableNodeID(source.GetID())
        series.SetXColumnName("index")
        series.SetYColumnName(yColumn)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetColor(*color)
        series.SetLineStyle(
            (
                slicer.vtkMRMLPlotSeriesNode.LineStyleDash
                if role == "threshold"
                else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid
            )
            if line
            else slicer.vtkMRMLPlotSeriesNode.LineStyleNone
        )
        series.SetMarkerStyle(
            slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if markers else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone
        )
        if markers:
            series.SetMarkerSize(8)
        series.SetLineWidth(2)
    chartNode.SetTitle(f"{case}: slice anomaly scores")
    chartNode.SetXAxisTitle("slice index")
    chartNode.SetYAxisTitle("normalised anomaly score")
    chartNode.SetLegendVisibility(True)
    chartNode.SetAttribute(ATTR_THRESHOLD, repr(float(threshold)))
    chartNode.SetAttribute(ATTR_ROLE, ROLE_CHART)
    return chartNode


def chartNodes(chartNode):
    """The chart's series and its companion table (for clean-up)."""
    nodes = [chartNode.GetNthPlotSeriesNode(i) for i in range(chartNode.GetNumberOfPlotSeriesNodes())]
    data = chartNode.GetNodeReference(CHART_DATA_REFERENCE)
    return [n for n in nodes + [data] if n is not None]
