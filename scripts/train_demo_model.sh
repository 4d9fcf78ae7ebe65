#!/usr/bin/env bash
# Rebuild the demo model shipped in Resources/Models/AnomalyFlagDemoChestCT from real chest CT.
# Training data: the pyradiomics sample CTs lung1 and lung2 (two patients, 109 slices); the tumour slices
# marked in their *_label.nrrd are excluded, so only normal-looking slices are learnt. About 30 minutes on
# two CPU cores. Run inside the environment that scripts/demo.sh sets up (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_sample_data.py --output data/sample
mkdir -p data/demo_train
cp data/sample/lung1_image.nrrd data/sample/lung1_label.nrrd data/sample/lung2_image.nrrd \
   data/sample/lung2_label.nrrd data/demo_train/
anomalyflag train --input data/demo_train --output Resources/Models/AnomalyFlagDemoChestCT \
    --image-size 128 --fov-mm 350 --window -1000 1000 --batch-size 16 --critic-steps 3 \
    --gan-iterations 1200 --encoder-iterations 1000 --seed 0 --device cpu
