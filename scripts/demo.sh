#!/usr/bin/env bash
# Install AnomalyFlag into .venv, fetch a real chest CT (pyradiomics sample data) and score it with the
# demo model shipped in Resources/Models. Outputs go to outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh . numpy setuptools
python scripts/fetch_sample_data.py --output data/sample
anomalyflag score \
    --model Resources/Models/AnomalyFlagDemoChestCT \
    --input data/sample/lung2_image.nrrd \
    --output outputs/demo \
    --montage
echo
echo "Per-slice scores: outputs/demo/lung2_image_slices.csv"
echo "Heatmap (same grid as the CT, load both in Slicer): outputs/demo/lung2_image_heatmap.nrrd"
echo "Summary: outputs/demo/lung2_image_summary.json; picture: outputs/demo/lung2_image_flagged.png"
