"""AnomalyFlag review in the browser (beside layer 3): a trame-slicer app over the MRML bridge's review loop.

Needs the `review-server` extra (trame-slicer, Python 3.10+); Slicer's own Python never imports it. Started by
`anomalyflag review-server` (which runs `python -m AnomalyFlagWeb`) or `python -m AnomalyFlagWeb` directly.
"""
