#!/usr/bin/env bash
# Rebuild the demo model shipped in Resources/Models/AnomalyFlagDemoChestCT from real chest CT.
# Training data: the normal slices of ONE patient, the pyradiomics sample CT lung1 (48 slices; the 3 slices
# of its labelled tumour, marked in lung1_label.nrrd, are left out). The demo then scores lung2, a patient
# the model never saw. Default backend and options (6,000 steps: 27 minutes on two CPU cores with bfloat16
# units, about twice that on a CPU without them), seed 0: on the same CPU and library versions this gives
# the shipped bundle again.
# Run inside the environment that scripts/demo.sh sets up (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_sample_data.py --output data/sample
rm -rf data/demo_train
mkdir -p data/demo_train
cp data/sample/lung1_image.nrrd data/sample/lung1_label.nrrd data/demo_train/
anomalyflag train --input data/demo_train --output Resources/Models/AnomalyFlagDemoChestCT \
    --seed 0 --device cpu
