"""Measuring the detector: slice and pixel metrics, the report JSON and picture, and the evaluation of
scored cases against their anomaly masks."""
