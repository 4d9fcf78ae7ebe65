#!/usr/bin/env python
"""Render slice views of scored phantoms with the MRML bridge (the README's screenshots).

A CT phantom with one inserted anomaly is scored by a model bundle (given with --model, e.g. the quality
benchmark's phantom model, or trained here on normal phantoms with the default backend in --minutes;
--keep-model keeps it for re-renders), published into a real MRML scene (slicer-core), and the anomaly's
most anomalous slice is rendered through Slicer's slice pipeline: CT in a soft-tissue window, the anomaly
heatmap over it and the organ segmentation as outlines, written to OUTPUT with the anomaly type appended
(`--kind all`: one picture per type).

    python scripts/render_screenshot.py [--model BUNDLE] [--kind all] [--output Resources/Screenshots/slice_view.png]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))

SIZE, SLICES, SPACING = 256, 48, (1.5, 1.5, 5.0)  # as the quality benchmark's phantoms
DEFAULT_RADIUS_MM = {"hypodense_lesion": 10.0, "hyperdense_lesion": 8.0, "metal_stent": 2.5, "fluid": 6.0}


def train_model(folder: Path, minutes: float) -> Path:
    from AnomalyFlagLib.phantom import make_phantom_set
    from AnomalyFlagLib.training import train

    data = folder / "normal"
    make_phantom_set(data, num_cases=12, anomalous=False, seed=0, num_slices=SLICES, size=SIZE, spacing=SPACING)
    started = time.time()
    bundle = train(data, folder / "model", max_minutes=minutes, checkpoint_every=10**9, device="auto", log=print)
    print(f"trained in {time.time() - started:.0f} s")
    return bundle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="calibrated bundle to use (default: train a small one on phantoms)")
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Screenshots" / "slice_view.png"))
    parser.add_argument("--keep-model", help="train into this folder and keep it (reused when it exists)")
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget when no --model is given")
    parser.add_argument("--seed", type=int, default=21, help="seed of the anomalous phantom")
    parser.add_argument("--size", type=int, default=512, help="PNG width and height")
    parser.add_argument(
        "--kind", default="metal_stent", help="anomaly kind (AnomalyFlagLib.phantom.ANOMALY_KINDS) or all"
    )
    parser.add_argument("--region", default="", help="organ the anomaly goes into (default: by kind)")
    parser.add_argument("--radius-mm", type=float, help="anomaly size (default: by kind)")
    parser.add_argument("--slice", type=int, help="slice to render (default: the anomaly's most anomalous one); "
                        "the same slice for several models compares their heatmaps")  # fmt: skip
    args = parser.parse_args(argv)

    from AnomalyFlagLib.phantom import ANOMALY_KINDS

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        elif args.keep_model and (Path(args.keep_model) / "model" / "metadata.json").exists():
            model = Path(args.keep_model) / "model"
        else:
            model = train_model(Path(args.keep_model or tmp), args.minutes)
        kinds = ANOMALY_KINDS if args.kind == "all" else (args.kind,)
        for kind in kinds:
            output = Path(args.output)
            output = output.with_name(f"{output.stem}_{kind}{output.suffix}")
            render(model, kind, args.radius_mm or DEFAULT_RADIUS_MM[kind], args.region, args.seed, output, args.size,
                   args.slice)  # fmt: skip
    return 0


def make_screenshot_phantom(kind: str, radius_mm: float, region: str, seed: int):
    """The anomalous phantom the pictures show (the quality benchmark's size and spacing)."""
    from AnomalyFlagLib.phantom import make_phantom

    spec = {"kind": kind, "radius_mm": radius_mm}
    if region:
        spec["region"] = region
    return make_phantom(SLICES, SIZE, SPACING, seed=seed, anomalies=[spec])


def render(model: Path, kind: str, radius_mm: float, region: str, seed: int, output: Path, size: int,
           slice_index=None) -> None:  # fmt: skip
    import slicer
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagLib.phantom import ORGAN_LABELS
    from AnomalyFlagMRML.snapshot import renderSliceSnapshot
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray
    from AnomalyFlagMRML.workflow import scoreVolumeNode

    phantom = make_screenshot_phantom(kind, radius_mm, region, seed)

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
    print(f"{kind} on slices {lesion_slices}; flagged {result.flagged_indices}")
    normalised = result.slices["normalised"]
    k = int(max(lesion_slices, key=lambda i: normalised[i])) if slice_index is None else slice_index
    path = renderSliceSnapshot(volume, out["heatmap"], segmentation, k, str(output), size=size,
                               caption=f"phantom CT, {kind.replace('_', ' ')}  slice {k}  score "
                               f"{normalised[k]:.1f}{'  FLAGGED' if k in result.flagged_indices else ''}")  # fmt: skip
    print(f"wrote {path} ({Path(path).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    sys.exit(main())
