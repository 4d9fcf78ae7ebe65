"""AnomalyFlag MRML bridge (layer 2): volume nodes <-> arrays, heatmap, table, chart and segmentation nodes,
display settings, navigation, slice snapshots, background running, the Qt-free workflow and the review and
worklist controller; the names they share are in constants.py.

Uses slicer (MRML) + vtk + numpy + AnomalyFlagLib only; no Qt, so it runs inside the Slicer application
and with the pip package slicer-core outside it. Nothing here imports torch until a model is loaded.
"""
