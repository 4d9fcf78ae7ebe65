"""AnomalyFlag MRML bridge (layer 2): volume nodes <-> arrays, heatmap, table, chart and segmentation nodes,
display settings, navigation, slice snapshots, background running and the Qt-free workflow.

Uses slicer (MRML) + vtk + numpy + AnomalyFlagLib only; no Qt, so it runs inside the Slicer application
and with the pip package slicer-core outside it.
"""

ATTRIBUTE_PREFIX = "AnomalyFlag."
