#!/usr/bin/env python
"""The continuous anomaly maps of several models on the same phantom slice, side by side.

The slice views of `render_screenshot.py` show the heatmap only above each model's calibrated pixel
threshold; this draws the whole normalised map (zero shown transparent) on the same phantom (seed, kind
and size as render_screenshot's defaults), with the anomaly outlined, one panel per model.

    python scripts/compare_maps.py --slice 21 --output maps.png restoration=MODEL_A stylegan2=MODEL_B ...
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    from render_screenshot import DEFAULT_RADIUS_MM, make_screenshot_phantom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=BUNDLE")
    parser.add_argument("--output", required=True)
    parser.add_argument("--kind", default="hyperdense_lesion")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--slice", type=int, required=True)
    args = parser.parse_args(argv)

    from AnomalyFlagLib.scoring import HEATMAP_SCALE, Scorer
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phantom = make_screenshot_phantom(args.kind, DEFAULT_RADIUS_MM[args.kind], "", args.seed)
    image, k = phantom.to_sitk(phantom.image.astype(np.int16)), args.slice
    ct = np.clip(phantom.image[k], -160, 240)
    columns = min(4, len(args.models) + 1)
    rows = -(-(len(args.models) + 1) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(rows, columns, 1)
    ax.imshow(ct, cmap="gray")
    ax.contour(phantom.anomaly_mask[k], [0.5], colors="lime", linewidths=0.8)
    ax.set_title(f"phantom, {args.kind.replace('_', ' ')}, slice {k}", fontsize=8)
    ax.axis("off")
    for i, item in enumerate(args.models):
        name, _, path = item.partition("=")
        scorer = Scorer(path, device="cpu")
        result = scorer.score(image)
        heat = result.heatmap[k].astype(np.float32) * HEATMAP_SCALE
        ax = fig.add_subplot(rows, columns, i + 2)
        ax.imshow(ct, cmap="gray")
        top = max(1e-3, float(np.percentile(heat, 99.9)))
        ax.imshow(np.ma.masked_less_equal(heat, 0), cmap="hot", alpha=0.7, vmin=0, vmax=top)
        ax.contour(phantom.anomaly_mask[k], [0.5], colors="lime", linewidths=0.8)
        score, threshold = result.slices["normalised"][k], scorer.calibration.threshold
        ax.set_title(f"{name}: score {score:.2f}, flag > {threshold:.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout(pad=0.6)
    fig.savefig(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
