"""Cases of a folder, a datalist or a single file, and the segmentation file that goes with each case.

In a folder, a volume whose name ends in _label, _mask, _anomaly or _lesion is the exclusion mask of
the volume with the same stem (an optional _image suffix is ignored); slices where it is non-zero are
left out of training. Files ending in _organs or _heatmap are companions, not cases.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import InputError
from .volumes import case_name, find_cases, refuse_duplicate_case_names

MASK_SUFFIXES = ("_label", "_mask", "_anomaly", "_lesion")
COMPANION_SUFFIXES = ("_organs", "_heatmap")


@dataclass
class Case:
    name: str
    image: Path
    mask: Optional[Path] = None


def _stem(path: Path) -> str:
    stem = case_name(path)
    return stem[: -len("_image")] if stem.endswith("_image") else stem


def discover_cases(path, name: str = "training input") -> List[Case]:
    """Cases from a datalist JSON ('training' and 'validation' lists of {image, label}), a folder or a file."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return _datalist_cases(path)
    files = find_cases(path, name)
    masks, images = {}, []
    for f in files:
        stem = case_name(f)
        if stem.endswith(MASK_SUFFIXES):
            key = stem.rsplit("_", 1)[0]
            if key in masks:
                raise InputError(f"{name} '{path}' holds two masks for case '{key}': '{masks[key]}' and '{f}'.")
            masks[key] = f
        elif not stem.endswith(COMPANION_SUFFIXES):
            images.append(f)
    if not images:
        raise InputError(f"{name} '{path}' holds masks but no image volumes.")
    return [Case(case_name(f), f, masks.get(_stem(f))) for f in images]


def roi_for_case(case: Case, roi: Optional[Path], single: bool) -> Optional[Path]:
    """The ROI file for a case: `roi` itself when it is a file and there is a `single` case, otherwise the
    file in folder `roi` named <case>.seg.nrrd, <case>_seg.*, <case>_organs.* or <case>.*; None if there is
    none. One ROI file for several cases is refused: each case needs its own segmentation."""
    if not roi:
        return None
    roi = Path(roi)
    if not roi.exists():
        raise InputError(f"ROI '{roi}' does not exist.")
    if roi.is_file():
        if not single:
            raise InputError(
                f"ROI '{roi}' is one file, but the input holds several cases; give a folder of "
                "<case>.seg.nrrd or <case>_seg.* files, one per case."
            )
        return roi
    for f in sorted(roi.iterdir()):
        if case_name(f) in (case.name, f"{case.name}.seg", f"{case.name}_seg", f"{case.name}_organs"):
            return f
    return None


def _datalist_cases(path: Path) -> List[Case]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"datalist '{path}' cannot be read: {exc}") from None
    entries = []
    for key in ("training", "validation", "test"):
        entries += data.get(key, []) if isinstance(data, dict) else []
    if not entries:
        raise InputError(f"datalist '{path}' has no 'training' or 'validation' entries.")
    cases = []
    for i, entry in enumerate(entries):
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(f"datalist '{path}' entry {i} has no 'image'.")
        image = (path.parent / entry["image"]).resolve()
        mask = entry.get("label") or entry.get("mask")
        cases.append(Case(case_name(image), image, (path.parent / mask).resolve() if mask else None))
    refuse_duplicate_case_names([c.image for c in cases], f"datalist '{path}'")
    return cases
