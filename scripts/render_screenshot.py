#!/usr/bin/env python
"""Render the README screenshot Resources/Screenshots/slice_view.png with the MRML bridge.

A CT phantom with an inserted anomaly (default: a metal stent in the aorta) is scored by a model bundle
(given with --model, or trained here on normal phantoms: about 10-15 minutes on a 2-core CPU; --keep-model
keeps it for re-renders), published into a real MRML scene (slicer-core), and the anomaly's most anomalous
slice is rendered through Slicer's slice pipeline: CT in a soft-tissue window, the anomaly heatmap over it
and the organ segmentation as outlines.

    python scripts/render_screenshot.py [--model BUNDLE] [--output Resources/Screenshots/slice_view.png]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))

SIZE, SLICES, SPACING = 160, 40, (2.4, 2.4, 4.0)


def train_model(folder: Path, iterations: int) -> Path:
    from AnomalyFlagLib.config import ModelConfig, PreprocessConfig
    from AnomalyFlagLib.detector import TrainingOptions
    from AnomalyFlagLib.phantom import make_phantom_set
    from AnomalyFlagLib.training import train

    data = folder / "normal"
    make_phantom_set(data, num_cases=8, anomalous=False, seed=0, num_slices=SLICES, size=SIZE, spacing=SPACING)
    started = time.time()
    bundle = train(
        data,
        folder / "model",
        ModelConfig(image_size=64, latent_dim=64, base_width=16, max_width=64),
        PreprocessConfig(window_min=-300.0, window_max=400.0, fov_mm=None),
        options=TrainingOptions(
            batch_size=32,
            gan_iterations=iterations,
            encoder_iterations=iterations,
            critic_steps=3,
            checkpoint_every=10**9,
        ),  # fmt: skip
        device="auto",
        log=print,
    )
    print(f"trained in {time.time() - started:.0f} s")
    return bundle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="calibrated bundle to use (default: train a small one on phantoms)")
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Screenshots" / "slice_view.png"))
    parser.add_argument("--keep-model", help="train into this folder and keep it (reused when it exists)")
    parser.add_argument("--iterations", type=int, default=400, help="training iterations per stage")
    parser.add_argument("--seed", type=int, default=21, help="seed of the anomalous phantom")
    parser.add_argument("--size", type=int, default=512, help="PNG width and height")
    parser.add_argument("--kind", default="metal_stent", help="anomaly kind (AnomalyFlagLib.phantom.ANOMALY_KINDS)")
    parser.add_argument("--region", default="", help="organ the anomaly goes into (default: by kind)")
    parser.add_argument("--radius-mm", type=float, default=20.0)
    args = parser.parse_args(argv)

    import slicer
    from AnomalyFlagLib.phantom import ORGAN_LABELS, make_phantom
    from AnomalyFlagMRML.snapshot import renderSliceSnapshot
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray
    from AnomalyFlagMRML.workflow import scoreVolumeNode

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        elif args.keep_model and (Path(args.keep_model) / "model" / "metadata.json").exists():
            model = Path(args.keep_model) / "model"
        else:
            model = train_model(Path(args.keep_model or tmp), args.iterations)
        spec = {"kind": args.kind, "radius_mm": args.radius_mm}
        if args.region:
            spec["region"] = args.region
        phantom = make_phantom(SLICES, SIZE, SPACING, seed=args.seed,
                               anomalies=[spec])  # fmt: skip
        from AnomalyFlagLib.geometry import Geometry

        geometry = Geometry.from_image(phantom.to_sitk())
        scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "abdomen CT")
        updateVolumeNodeFromArray(volume, phantom.image, geometry)
        labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "organs")
        organs = np.zeros_like(phantom.organs)
        for value, name in enumerate(("liver", "spleen", "kidney_left", "kidney_right"), start=1):
            organs[phantom.organs == ORGAN_LABELS[name]] = value
        updateVolumeNodeFromArray(labels, organs, geometry)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
        colors = {"liver": (0.85, 0.45, 0.95), "spleen": (0.3, 0.75, 1.0), "kidney": (0.35, 0.95, 0.45)}
        seg = segmentation.GetSegmentation()
        for i, name in enumerate(("liver", "spleen", "kidney L", "kidney R")):
            seg.GetNthSegment(i).SetName(name)
            seg.GetNthSegment(i).SetColor(*colors[name.split()[0]])
        out = scoreVolumeNode(volume, model, segmentationNode=segmentation, useSegmentationAsRoi=False)
        result = out["result"]
        lesion_slices = phantom.anomalies[0]["slices"]
        print(f"lesion on slices {lesion_slices}; flagged {result.flagged_indices}")
        normalised = result.slices["normalised"]
        k = int(max(lesion_slices, key=lambda i: normalised[i]))  # the anomaly's most anomalous slice
        path = renderSliceSnapshot(volume, out["heatmap"], segmentation, k, args.output, size=args.size,
                                   caption=f"phantom CT  slice {k}  score {normalised[k]:.1f}"
                                   f"{'  FLAGGED' if k in result.flagged_indices else ''}")  # fmt: skip
        print(f"wrote {path} ({Path(path).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
