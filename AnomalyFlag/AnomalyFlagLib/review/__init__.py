"""The review loop: a reviewer's session on one scored case (sidecar and lock), versioned edited
labels, and active learning (ranking unlabelled cases, exporting reviewed ones for retraining)."""
