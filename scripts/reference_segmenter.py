#!/usr/bin/env python
"""Reference segmentation model: a 2D MONAI U-Net for one organ (the liver by default), trained by the
project on normal phantoms, standing in for a clinic's deployed model so that AnomalyFlag's flags can be
measured against the slices where a segmentation model actually fails. An evaluation tool, not part of
the extension.

    python scripts/reference_segmenter.py train --input NORMALS --output MODEL [--minutes 20] [--seed 0]
    python scripts/reference_segmenter.py predict --model MODEL --input FOLDER_OR_FILE --output FOLDER
    python scripts/reference_segmenter.py evaluate --input FOLDER --segmentations FOLDER [--output dice.json]

train: NORMALS holds CT volumes <case>.nrrd (any ITK format, or DICOM series folders) and their organ
label maps <case>_organs.* (AnomalyFlagLib.phantom's files; --label names the organ, or gives its label
value). Slices where a case's <case>_anomaly/_label/_mask/_lesion mask is non-zero are left out. The
last case (or --validation-case) is held out for the validation Dice. Training stops at the time budget
(--minutes) or after --iterations steps, whichever comes first. MODEL receives model.safetensors and
model.json (architecture, window, pixel size, label, training record with the validation Dice) and
nothing else; it is replaced as a whole or not at all, and loading never unpickles.

predict: for every volume of the input, <case>_seg.nrrd (uint8, 1 = the organ, the input's exact grid;
the largest 3D connected component of the thresholded softmax, as deployed organ models post-process,
unless --all-components) and <case>_uncertainty.csv: one row per axial slice (the AxialFrame index
AnomalyFlag's scorer uses): index, entropy_in_contour, entropy_band, mean_entropy = the mean softmax
entropy (bits, 0-1) inside the predicted contour, within BAND_MM of its boundary (either side), and over
both; nan where empty.

evaluate: Dice of each <case>_seg.* in --segmentations against the organ in <case>_organs.* of --input,
per volume and per slice, with the slices that an anomaly (<case>_anomaly.*) touches reported apart, and
the share of the organ's voxels inside the anomaly that the segmentation includes (a lesion left out of
the contour barely moves the slice's Dice).
"""

import argparse
import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))

from AnomalyFlagLib.atomic_files import atomic_path, sha256_of, write_json_atomic, write_text_atomic  # noqa: E402
from AnomalyFlagLib.errors import AnomalyFlagError, InputError  # noqa: E402
from AnomalyFlagLib.geometry import Geometry, require_same_geometry  # noqa: E402
from AnomalyFlagLib.io.cases import Case, discover_cases  # noqa: E402
from AnomalyFlagLib.io.volumes import case_name, is_volume_file, read_image, validate_image, write_image_atomic  # noqa: E402
from AnomalyFlagLib.orientation import AxialFrame  # noqa: E402
from AnomalyFlagLib.phantom import ORGAN_LABELS  # noqa: E402
from AnomalyFlagLib.preprocessing import largest_component  # noqa: E402

FORMAT = "anomalyflag-reference-segmenter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
MODEL_FILES = (WEIGHTS_FILE, METADATA_FILE)

ARCHITECTURE = {
    "name": "monai.networks.nets.UNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,  # background, organ
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "instance",
}
WINDOW_HU = (-200.0, 300.0)
PIXEL_MM = 1.5  # slices are resampled to this pixel size for the network, and its output back
BAND_MM = 5.0
ORGAN_SUFFIX = "_organs"
SEGMENTATION_SUFFIX = "_seg"
UNCERTAINTY_SUFFIX = "_uncertainty.csv"
UNCERTAINTY_COLUMNS = ("index", "entropy_in_contour", "entropy_band", "mean_entropy")
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
VALIDATE_EVERY = 250
FAIL_DICE = 0.8  # evaluate: a slice whose Dice is below this counts as a failure of the model

Log = Callable[[str], None]


class ModelError(AnomalyFlagError):
    """The reference model folder is missing, damaged or not a reference segmenter model."""


# ----------------------------------------------------------------------------------------------------
# Volumes, labels and axial slices


def label_value(label: str) -> int:
    """The label value of an organ name of AnomalyFlagLib.phantom.ORGAN_LABELS, or a value given as a number."""
    if label in ORGAN_LABELS and ORGAN_LABELS[label] > 0:
        return ORGAN_LABELS[label]
    if label.isdigit() and 0 < int(label) < 256:
        return int(label)
    names = ", ".join(n for n, v in ORGAN_LABELS.items() if v > 0)
    raise InputError(f"label '{label}' is neither an organ name ({names}) nor a label value 1-255.")


def companion_file(case: Case, suffix: str, folder: Optional[Path] = None) -> Optional[Path]:
    """The volume <case><suffix>.* in FOLDER (default: beside the case's image), or None."""
    folder = Path(folder) if folder is not None else case.image.parent
    stems = {case.name + suffix}
    if case.name.endswith("_image"):
        stems.add(case.name[: -len("_image")] + suffix)
    found = sorted(f for f in folder.iterdir() if is_volume_file(f) and case_name(f) in stems)
    if len(found) > 1:
        shown = ", ".join(f"'{f.name}'" for f in found)
        raise InputError(f"folder '{folder}' holds several {suffix[1:]} files for case '{case.name}': {shown}.")
    return found[0] if found else None


def read_axial(path: Path, name: str) -> Tuple[sitk.Image, np.ndarray, AxialFrame]:
    """A volume, its voxels as (slice, row, column) axial slices (a view) and its AxialFrame."""
    image = read_image(path, name)
    validate_image(image, f"{name} '{path}'")
    frame = AxialFrame.from_geometry(Geometry.from_image(image))
    return image, frame.view(sitk.GetArrayFromImage(image)), frame


def read_companion(path: Path, image: sitk.Image, name: str) -> np.ndarray:
    """A label volume on IMAGE's grid, as (slice, row, column) axial slices."""
    labels = read_image(path, name)
    validate_image(labels, f"{name} '{path}'")
    require_same_geometry(Geometry.from_image(image), Geometry.from_image(labels), "its image", f"{name} '{path}'")
    return AxialFrame.from_geometry(Geometry.from_image(image)).view(sitk.GetArrayFromImage(labels))


def window(hu: torch.Tensor, window_hu=WINDOW_HU) -> torch.Tensor:
    lo, hi = window_hu
    return ((hu - lo) / (hi - lo)).clamp_(0.0, 1.0)


def model_grid_size(shape: Tuple[int, int], spacing: Tuple[float, float], pixel_mm: float) -> Tuple[int, int]:
    return tuple(max(1, int(round(n * s / pixel_mm))) for n, s in zip(shape, spacing))


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W), antialiased when shrinking; unchanged when the size is the same."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; nan when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else float("nan")


# ----------------------------------------------------------------------------------------------------
# The model folder


def build_network(architecture: dict) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=int(architecture["spatial_dims"]),
        in_channels=int(architecture["in_channels"]),
        out_channels=int(architecture["out_channels"]),
        channels=tuple(int(c) for c in architecture["channels"]),
        strides=tuple(int(s) for s in architecture["strides"]),
        num_res_units=int(architecture["num_res_units"]),
        norm=str(architecture["norm"]),
    )


def pad_multiple(architecture: dict) -> int:
    return int(np.prod(architecture["strides"]))


def save_model(folder: Path, network: torch.nn.Module, metadata: dict) -> Path:
    """Write MODEL_FILES into FOLDER as one atomic replacement; refuse a folder that holds anything else."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise InputError(f"model output '{folder}' exists and is not a folder.")
        others = sorted(p.name for p in folder.iterdir() if p.name not in MODEL_FILES)
        if others:
            raise InputError(
                f"model output '{folder}' holds other files ({', '.join(others[:3])}); give a new or empty "
                "folder, or an earlier reference segmenter model to replace."
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        metadata = dict(metadata, weights={"file": WEIGHTS_FILE, "sha256": sha256_of(tmp / WEIGHTS_FILE)})
        write_json_atomic(tmp / METADATA_FILE, metadata)
    return folder


def load_model(folder) -> Tuple[torch.nn.Module, dict]:
    """The network (eval mode, CPU) and metadata of a model folder: JSON and safetensors only, checked."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    where = f"reference segmenter model '{folder}'"
    if not folder.is_dir():
        raise ModelError(f"{where} does not exist or is not a folder (train one with 'train').")
    meta_path, weights_path = folder / METADATA_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ModelError(f"{where} has no {path.name}; it is not a complete model (train it again).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: {METADATA_FILE} cannot be read ({exc}); the model is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{where}: {METADATA_FILE} is not a reference segmenter model description.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{where} has format version {meta.get('format_version')!r}; this script reads {FORMAT_VERSION}."
        )
    try:
        architecture = meta["architecture"]
        low, high = (float(v) for v in meta["input"]["window_hu"])
        pixel_mm = float(meta["input"]["pixel_mm"])
        expected = str(meta["weights"]["sha256"])
        int(meta["label"]["value"])
        network = build_network(architecture)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: {METADATA_FILE} is incomplete or invalid ({type(exc).__name__}: {exc}).") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low and math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ModelError(f"{where}: {METADATA_FILE} has an invalid window or pixel size.")
    if sha256_of(weights_path) != expected:
        raise ModelError(f"{where}: {WEIGHTS_FILE} does not match its checksum in {METADATA_FILE}; it is damaged.")
    try:
        state = load_file(str(weights_path), device="cpu")
        network.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ModelError(f"{where}: the weights do not fit the architecture ({str(exc).splitlines()[0]}).") from None
    network.eval()
    return network, meta


# ----------------------------------------------------------------------------------------------------
# Prediction


@torch.no_grad()
def foreground_probability(
    network: torch.nn.Module, slices_hu: np.ndarray, spacing: Tuple[float, float], meta: dict, batch: int = BATCH_SIZE
) -> np.ndarray:
    """Softmax probability of the organ, (slice, row, column) float32, for axial slices in HU."""
    window_hu = tuple(meta["input"]["window_hu"])
    multiple = pad_multiple(meta["architecture"])
    shape = tuple(slices_hu.shape[1:])
    size = model_grid_size(shape, spacing, float(meta["input"]["pixel_mm"]))
    padded = tuple(int(math.ceil(n / multiple)) * multiple for n in size)
    out = np.empty(slices_hu.shape, dtype=np.float32)
    for k0 in range(0, slices_hu.shape[0], batch):
        x = torch.from_numpy(np.ascontiguousarray(slices_hu[k0 : k0 + batch], dtype=np.float32))[:, None]
        x = resize(window(x, window_hu), size)
        x = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]))
        logits = network(x)[:, :, : size[0], : size[1]]
        probability = torch.softmax(resize(logits, shape), dim=1)[:, 1]
        out[k0 : k0 + batch] = probability.numpy()
    return out


def binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    q = np.clip(p.astype(np.float64), 1e-12, 1.0 - 1e-12)
    return -(q * np.log2(q) + (1.0 - q) * np.log2(1.0 - q))


def _disk(row_spacing: float, column_spacing: float, radius_mm: float) -> torch.Tensor:
    ry, rx = int(radius_mm // row_spacing), int(radius_mm // column_spacing)
    y = np.arange(-ry, ry + 1).reshape(-1, 1) * row_spacing
    x = np.arange(-rx, rx + 1).reshape(1, -1) * column_spacing
    return torch.from_numpy(((y**2 + x**2) <= radius_mm**2).astype(np.float32))[None, None]


def boundary_band(mask: np.ndarray, row_spacing: float, column_spacing: float, radius_mm: float = BAND_MM):
    """Pixels within RADIUS_MM of the mask's boundary, inside or outside it: dilation minus erosion."""
    kernel = _disk(row_spacing, column_spacing, radius_mm)
    pad = (kernel.shape[-1] // 2, kernel.shape[-1] // 2, kernel.shape[-2] // 2, kernel.shape[-2] // 2)
    m = torch.from_numpy(mask.astype(np.float32))[:, None]
    dilated = F.conv2d(F.pad(m, pad), kernel)[:, 0] > 0.5
    eroded = F.conv2d(F.pad(1.0 - m, pad, value=1.0), kernel)[:, 0] < 0.5
    return (dilated & ~eroded).numpy()


def uncertainty_rows(probability: np.ndarray, prediction: np.ndarray, frame: AxialFrame) -> List[tuple]:
    """(index, entropy_in_contour, entropy_band, mean_entropy) per axial slice; nan where the region is empty."""
    entropy = binary_entropy_bits(probability)
    band = boundary_band(prediction, frame.row_spacing, frame.column_spacing)

    def mean(values, where):
        return float(values[where].mean()) if where.any() else float("nan")

    return [
        (k, mean(entropy[k], prediction[k]), mean(entropy[k], band[k]), mean(entropy[k], prediction[k] | band[k]))
        for k in range(prediction.shape[0])
    ]


def uncertainty_csv(rows: List[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(UNCERTAINTY_COLUMNS)
    for index, *values in rows:
        writer.writerow([index] + [f"{v:.6g}" if math.isfinite(v) else "nan" for v in values])
    return buf.getvalue()


def segment(
    network: torch.nn.Module, meta: dict, image: sitk.Image, slices: np.ndarray, frame: AxialFrame,
    all_components: bool = False,
):  # fmt: skip
    """(label map on IMAGE's grid, (slice, row, column) probability, prediction) for one volume; the
    prediction is the largest face-connected 3D component unless ALL_COMPONENTS: the organ is one piece,
    islands are the model's errors."""
    probability = foreground_probability(network, slices, (frame.row_spacing, frame.column_spacing), meta)
    prediction = probability > 0.5
    if not all_components:
        prediction = largest_component(prediction)
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    frame.view(labels)[...] = prediction
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out, probability, prediction


def predict(model, input_path, output, log: Log = print, all_components: bool = False) -> List[Path]:
    """Write <case>_seg.nrrd and <case>_uncertainty.csv into OUTPUT for every volume of INPUT_PATH."""
    network, meta = load_model(model)
    cases = discover_cases(input_path, "prediction input")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        started = time.monotonic()
        image, slices, frame = read_axial(case.image, "volume")
        seg, probability, prediction = segment(network, meta, image, slices, frame, all_components)
        seg_path = output / f"{case.name}{SEGMENTATION_SUFFIX}.nrrd"
        write_image_atomic(seg, seg_path)
        csv_path = write_text_atomic(output / f"{case.name}{UNCERTAINTY_SUFFIX}", uncertainty_csv(
            uncertainty_rows(probability, prediction, frame)))  # fmt: skip
        written += [seg_path, csv_path]
        slices_with = int(prediction.any(axis=(1, 2)).sum())
        log(f"{case.name}: {meta['label']['name']} on {slices_with} of {len(prediction)} slices "
            f"({time.monotonic() - started:.1f} s)")  # fmt: skip
    return written


# ----------------------------------------------------------------------------------------------------
# Training


def load_training_cases(folder, value: int, label: str, log: Log) -> List[dict]:
    """Each case of FOLDER with its organ mask, as (slice, row, column) arrays, slices with anomalies dropped."""
    cases = discover_cases(folder, "training input")
    out = []
    for case in cases:
        organs_path = companion_file(case, ORGAN_SUFFIX)
        if organs_path is None:
            raise InputError(
                f"training case '{case.name}' in '{folder}' has no label map {case.name}{ORGAN_SUFFIX}.nrrd "
                "(an organ label map on the image's grid, as AnomalyFlagLib.phantom writes)."
            )
        image, slices, frame = read_axial(case.image, "training volume")
        organ = read_companion(organs_path, image, "label map") == value
        keep = np.ones(len(slices), dtype=bool)
        if case.mask is not None:
            keep &= ~read_companion(case.mask, image, "mask").any(axis=(1, 2))
        hu = np.ascontiguousarray(slices, dtype=np.float32)
        out.append({"name": case.name, "image": image, "frame": frame, "hu": hu, "organ": np.ascontiguousarray(organ),
                    "keep": keep})  # fmt: skip
    total = sum(int(c["organ"][c["keep"]].sum()) for c in out)
    if total == 0:
        raise InputError(
            f"the label maps in '{folder}' hold no '{label}' voxels (label value {value}) on usable slices; "
            "give the organ the maps label (--label), or data that contains it."
        )
    log(f"{len(out)} cases, {sum(int(c['keep'].sum()) for c in out)} slices, {total} {label} voxels")
    return out


def model_grid_slices(case: dict, pixel_mm: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A case's kept slices on the model's pixel grid: HU (N, 1, H, W) float16 and organ (N, 1, H, W) uint8."""
    frame = case["frame"]
    keep = case["keep"]
    hu = torch.from_numpy(case["hu"][keep])[:, None]
    organ = torch.from_numpy(case["organ"][keep].astype(np.float32))[:, None]
    size = model_grid_size(tuple(hu.shape[-2:]), (frame.row_spacing, frame.column_spacing), pixel_mm)
    hu_grid = torch.cat([resize(hu[i : i + 16], size) for i in range(0, len(hu), 16)]) if len(hu) else hu
    organ_grid = torch.cat([resize(organ[i : i + 16], size) for i in range(0, len(hu), 16)]) if len(hu) else organ
    return hu_grid.to(torch.float16), (organ_grid >= 0.5).to(torch.uint8)


def _canvas(tensors: List[torch.Tensor], multiple: int, fill: float) -> torch.Tensor:
    """Pad (N, 1, H, W) tensors, centred, to one size (a multiple of MULTIPLE) and concatenate them."""
    height = int(math.ceil(max(t.shape[-2] for t in tensors) / multiple)) * multiple
    width = int(math.ceil(max(t.shape[-1] for t in tensors) / multiple)) * multiple
    out = []
    for t in tensors:
        dy, dx = height - t.shape[-2], width - t.shape[-1]
        out.append(F.pad(t.float(), (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2), value=fill).to(t.dtype))
    return torch.cat(out)


def augment(hu: torch.Tensor, organ: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windowed, augmented batch: HU shift and contrast, extra noise, then rotation (+-10 degrees), scale
    (0.9-1.1) and shift (+-5%) of image and label together. No flips: the liver is on the patient's right."""
    n = hu.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    x = hu.float()
    x = (x - 40.0) * uniform(0.9, 1.1, 1, 1, 1) + 40.0 + uniform(-20.0, 20.0, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 10.0, 1, 1, 1)
    x = window(x)
    angle = uniform(-math.pi / 18, math.pi / 18)
    scale = uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, uniform(-0.05, 0.05)], 1),
                         torch.stack([sin, cos, uniform(-0.05, 0.05)], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(organ.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y


def train(
    input_folder,
    output,
    minutes: float = 20.0,
    seed: int = 0,
    label: str = "liver",
    iterations: Optional[int] = None,
    validation_case: Optional[str] = None,
    log: Log = print,
) -> dict:
    """Train the reference U-Net on INPUT_FOLDER's cases and write the model folder OUTPUT; returns its metadata."""
    import monai
    from monai.losses import DiceCELoss

    if not (minutes > 0 and math.isfinite(minutes)):
        raise InputError(f"--minutes must be a positive number, not {minutes}.")
    if iterations is not None and iterations < 1:
        raise InputError(f"--iterations must be at least 1, not {iterations}.")
    value = label_value(label)
    label_name = label if label in ORGAN_LABELS else f"label {value}"
    cases = load_training_cases(input_folder, value, label_name, log)
    if len(cases) < 2:
        raise InputError(f"training input '{input_folder}' holds {len(cases)} case; two or more are needed "
                         "(one is held out for validation).")  # fmt: skip
    with_organ = [c for c in cases if c["organ"].any()]
    if validation_case is None:
        held_out = with_organ[-1]
    else:
        held_out = next((c for c in cases if c["name"] == validation_case), None)
        if held_out is None or not held_out["organ"].any():
            raise InputError(
                f"--validation-case '{validation_case}' is not a case of '{input_folder}' with {label_name} voxels."
            )
    training_cases = [c for c in cases if c is not held_out]
    if not any(c["organ"][c["keep"]].any() for c in training_cases):
        raise InputError(
            f"only the validation case '{held_out['name']}' holds {label_name} voxels; nothing to learn from."
        )

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    multiple = pad_multiple(ARCHITECTURE)
    grids = [model_grid_slices(c, PIXEL_MM) for c in training_cases if c["keep"].any()]
    for c in training_cases:
        del c["hu"], c["organ"]  # on the model grid now
    hu_all = _canvas([g[0] for g in grids], multiple, fill=-1000.0)
    organ_all = _canvas([g[1] for g in grids], multiple, fill=0.0)
    log(f"training on {len(hu_all)} slices of {hu_all.shape[-2]}x{hu_all.shape[-1]} at {PIXEL_MM} mm "
        f"from {len(training_cases)} cases; validation on '{held_out['name']}'")  # fmt: skip

    network = build_network(ARCHITECTURE)
    optimiser = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": dict(ARCHITECTURE),
        "input": {"window_hu": list(WINDOW_HU), "pixel_mm": PIXEL_MM, "slices": "axial, AnomalyFlagLib AxialFrame"},
        "label": {"name": label_name, "value": value, "output_value": 1},
    }

    def validate() -> float:
        network.eval()
        _, _, prediction = segment(network, meta, held_out["image"], held_out["hu"], held_out["frame"])
        network.train()
        return dice(prediction, held_out["organ"])

    budget = minutes * 60.0
    started = time.monotonic()
    history, losses, step = [], [], 0
    network.train()
    while True:
        elapsed = time.monotonic() - started
        progress = max(elapsed / budget, step / iterations if iterations else 0.0)
        if progress >= 1.0:
            break
        for group in optimiser.param_groups:  # cosine decay over the budget (time or steps)
            group["lr"] = LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))
        index = torch.from_numpy(rng.integers(0, len(hu_all), size=BATCH_SIZE))
        x, y = augment(hu_all[index], organ_all[index], generator)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % VALIDATE_EVERY == 0:
            history.append([step, round(validate(), 4)])
            log(f"step {step}: loss {np.mean(losses[-VALIDATE_EVERY:]):.4f}, validation Dice {history[-1][1]:.4f} "
                f"({time.monotonic() - started:.0f} s)")  # fmt: skip
    seconds = time.monotonic() - started
    validation_dice = validate()
    network.eval()
    meta["training"] = {
        "input": str(Path(input_folder).resolve()),
        "cases": [c["name"] for c in training_cases],
        "validation_case": held_out["name"],
        "validation_dice": round(validation_dice, 4),
        "validation_history": history,
        "steps": step,
        "seconds": round(seconds, 1),
        "minutes_budget": minutes,
        "iterations": iterations,
        "seed": seed,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "schedule": "Adam, cosine decay over the budget (time or steps, whichever ends first)",
        "loss": "monai.losses.DiceCELoss(softmax, batch Dice)",
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "augmentation": "HU shift +-20 and contrast 0.9-1.1, noise 0-10 HU, rotation +-10 deg, scale 0.9-1.1, "
        "shift +-5%; no flips",
        "slices": int(len(hu_all)),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
    }
    save_model(output, network, meta)
    log(f"{step} steps in {seconds:.0f} s; validation Dice on '{held_out['name']}' {validation_dice:.4f}; "
        f"model in {output}")  # fmt: skip
    return meta


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _summary(values: List[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def evaluate(input_folder, segmentations, label: str = "liver", log: Log = print) -> dict:
    """Dice per volume and per slice of each case's <case>_seg.* in SEGMENTATIONS against its organ label map."""
    value = label_value(label)
    report = {"label": label, "value": value, "fail_below_dice": FAIL_DICE, "cases": {}}
    pooled: Dict[str, List[float]] = {"all": [], "anomaly": [], "anomaly_in_organ": [], "other": []}
    anomaly_voxels = [0, 0]  # of the organ's voxels inside anomalies: in the segmentation, all
    for case in discover_cases(input_folder, "evaluation input"):
        seg_path = companion_file(case, SEGMENTATION_SUFFIX, Path(segmentations))
        organs_path = companion_file(case, ORGAN_SUFFIX)
        if seg_path is None:
            raise InputError(
                f"'{segmentations}' holds no segmentation {case.name}{SEGMENTATION_SUFFIX}.* of case '{case.name}'."
            )
        if organs_path is None:
            raise InputError(f"case '{case.name}' has no label map {case.name}{ORGAN_SUFFIX}.* beside it.")
        image, _, _ = read_axial(case.image, "volume")
        truth = read_companion(organs_path, image, "label map") == value
        prediction = read_companion(seg_path, image, "segmentation") > 0
        anomaly = read_companion(case.mask, image, "mask") > 0 if case.mask is not None else np.zeros_like(truth)
        per_slice = [dice(prediction[k], truth[k]) for k in range(len(truth))]
        touched = anomaly.any(axis=(1, 2))
        in_organ = (anomaly & truth).any(axis=(1, 2))
        groups = {"all": np.ones(len(truth), bool), "anomaly": touched, "anomaly_in_organ": in_organ, "other": ~touched}
        entry = {"volume_dice": round(dice(prediction, truth), 4), "slices": len(truth)}
        inside = anomaly & truth
        recalled = int(np.count_nonzero(inside & prediction))
        entry["anomaly_voxels_in_organ"] = int(np.count_nonzero(inside))
        entry["anomaly_in_organ_recall"] = round(recalled / inside.sum(), 4) if inside.any() else None
        anomaly_voxels[0] += recalled
        anomaly_voxels[1] += entry["anomaly_voxels_in_organ"]
        for key, where in groups.items():
            values = [per_slice[k] for k in np.flatnonzero(where)]
            pooled[key] += values
            finite = [v for v in values if math.isfinite(v)]
            entry[f"slice_dice_{key}"] = _summary(values)
            entry[f"failed_slices_{key}"] = int(sum(v < FAIL_DICE for v in finite))
            entry[f"scored_slices_{key}"] = len(finite)
        entry["slice_dice"] = [None if not math.isfinite(v) else round(v, 4) for v in per_slice]
        report["cases"][case.name] = entry
        log(f"{case.name}: volume Dice {entry['volume_dice']:.4f}, slice Dice {entry['slice_dice_all']}, "
            f"on anomaly slices {entry['slice_dice_anomaly']}")  # fmt: skip
    volumes = [c["volume_dice"] for c in report["cases"].values()]
    report["summary"] = {"cases": len(volumes), "mean_volume_dice": _summary(volumes)}
    report["summary"]["anomaly_voxels_in_organ"] = anomaly_voxels[1]
    report["summary"]["anomaly_in_organ_recall"] = (
        round(anomaly_voxels[0] / anomaly_voxels[1], 4) if anomaly_voxels[1] else None
    )
    for key, values in pooled.items():
        finite = [v for v in values if math.isfinite(v)]
        report["summary"][f"mean_slice_dice_{key}"] = _summary(values)
        report["summary"][f"scored_slices_{key}"] = len(finite)
        report["summary"][f"failure_rate_{key}"] = (
            round(sum(v < FAIL_DICE for v in finite) / len(finite), 4) if finite else None
        )
    log("summary: " + ", ".join(f"{k} {v}" for k, v in report["summary"].items()))
    return report


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train the reference U-Net on normal volumes with organ label maps")
    p.add_argument("--input", required=True, help="folder of <case>.nrrd with <case>_organs.nrrd")
    p.add_argument("--output", required=True, help="model folder to write (model.safetensors, model.json)")
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    p.add_argument("--iterations", type=int, help="stop after this many steps (tests, reproducible runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="liver", help="organ name of AnomalyFlagLib.phantom.ORGAN_LABELS, or a value")
    p.add_argument("--validation-case", help="case held out for the validation Dice (default: the last)")
    p = commands.add_parser("predict", help="segment volumes: <case>_seg.nrrd and <case>_uncertainty.csv")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="a volume, a DICOM series folder, a folder or a datalist")
    p.add_argument("--output", required=True, help="folder for the segmentations and uncertainty tables")
    p.add_argument("--all-components", action="store_true",
                   help="keep every connected component of the contour (default: the largest, the organ)")  # fmt: skip
    p = commands.add_parser("evaluate", help="Dice of segmentations against the organ label maps")
    p.add_argument("--input", required=True, help="folder of <case>.nrrd with <case>_organs.nrrd")
    p.add_argument("--segmentations", required=True, help="folder of <case>_seg.nrrd")
    p.add_argument("--label", default="liver")
    p.add_argument("--output", help="JSON report to write")
    args = parser.parse_args(argv)
    caller_threads = torch.get_num_threads()  # restored on return: main() also runs inside other processes
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    try:
        if args.command == "train":
            train(args.input, args.output, args.minutes, args.seed, args.label, args.iterations, args.validation_case)
        elif args.command == "predict":
            predict(args.model, args.input, args.output, all_components=args.all_components)
        else:
            report = evaluate(args.input, args.segmentations, args.label)
            if args.output:
                write_json_atomic(args.output, report, indent=1)
    except AnomalyFlagError as exc:
        print(f"reference_segmenter: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(caller_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
