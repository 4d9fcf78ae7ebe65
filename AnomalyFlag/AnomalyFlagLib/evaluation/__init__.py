"""Measuring the detector: slice and pixel metrics, the report JSON and picture, segmentation failures
(the automatic contour against a reference, per slice), and the evaluation of scored cases."""
