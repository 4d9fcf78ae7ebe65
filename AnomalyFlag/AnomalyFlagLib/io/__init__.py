"""Reading what users give: volumes and DICOM series (checked, streamed slab by slab), case folders,
and the scored-case format the CLI, the Slicer module, the review and the benchmarks share."""
