"""Cases of a folder, a datalist or a single file, and the segmentation file that goes with each case.

In a folder, a volume whose name ends in _label, _mask, _anomaly or _lesion is the exclusion mask of
the volume with the same stem (an optional _image suffix is ignored); slices where it is non-zero are
left out of training. Files ending in _organs or _heatmap are companions, not cases.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InputError
from .volumes import case_name, find_cases, refuse_duplicate_case_names

MASK_SUFFIXES = ("_label", "_mask", "_anomaly", "_lesion")
SEGMENTATION_SUFFIX = "_seg"
REFERENCE_SUFFIX = "_reference"
COMPANION_SUFFIXES = ("_organs", "_heatmap", SEGMENTATION_SUFFIX, REFERENCE_SUFFIX)


@dataclass
class Case:
    """A volume with what may go with it: `mask` (anomaly ground truth, or slices to leave out of
    training), `segmentation` (the deployed model's automatic contour: organ-aware scores) and `reference`
    (a reference contour of the same structure, to measure the automatic one's failures)."""

    name: str
    image: Path
    mask: Optional[Path] = None
    segmentation: Optional[Path] = None
    reference: Optional[Path] = None


def _files_by_name(folder: Path) -> Dict[str, List[Path]]:
    """The files of `folder` by case name (one listing for every case's companions)."""
    index: Dict[str, List[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file():
            index.setdefault(case_name(f), []).append(f)
    return index


def _companion(index: Dict[str, List[Path]], folder: Path, stem: str, suffix: str) -> Optional[Path]:
    """`<stem><suffix>.*` among the folder's files `index` (a volume or a .seg.nrrd); for the segmentation
    also `<stem>.seg.nrrd`."""
    names = {f"{stem}{suffix}", f"{stem}{suffix}.seg"} | ({f"{stem}.seg"} if suffix == SEGMENTATION_SUFFIX else set())
    found = sorted(f for name in names for f in index.get(name, ()))
    if len(found) > 1:
        raise InputError(f"folder '{folder}' holds several {suffix[1:]} files for case '{stem}': "
                         f"{', '.join(repr(str(f.name)) for f in found)}; keep one.")  # fmt: skip
    return found[0] if found else None


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
    index = _files_by_name(path) if path.is_dir() else None
    cases = []
    for f in images:
        stem = _stem(f)
        companions = index is not None and f.parent == path
        cases.append(Case(case_name(f), f, masks.get(stem),
                          _companion(index, path, stem, SEGMENTATION_SUFFIX) if companions else None,
                          _companion(index, path, stem, REFERENCE_SUFFIX) if companions else None))  # fmt: skip
    return cases


def roi_for_case(case: Case, roi: Optional[Path], single: bool) -> Optional[Path]:
    """The ROI file for a case: `roi` itself when it is a file and there is a `single` case, otherwise the
    file in folder `roi` named <case>.seg.nrrd, <case>_seg.*, <case>_organs.* or <case>.*; without `roi`
    the case's own segmentation beside it (`<case>_seg.*`), else None. One ROI file for several cases is
    refused: each case needs its own segmentation."""
    if not roi:
        return case.segmentation
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
        extra = {key: entry.get(key) for key in ("segmentation", "reference")}
        mask = entry.get("label") or entry.get("mask")
        extra = {key: (path.parent / value).resolve() if value else None for key, value in extra.items()}
        cases.append(Case(case_name(image), image, (path.parent / mask).resolve() if mask else None, **extra))
    refuse_duplicate_case_names([c.image for c in cases], f"datalist '{path}'")
    return cases


def parse_shard(text: str):
    """'I/N' (0 <= I < N) -> (I, N); an InputError says what is wrong."""
    index, _, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"shard '{text}' must be I/N with 0 <= I < N, e.g. 0/4 for the first of four.")
    return i, n


def shard_cases(cases: List[Case], index: int, count: int) -> List[Case]:
    """The cases of shard `index` of `count`: every count-th case by name, starting at `index`, so that
    the shards of one folder never overlap and together hold every case."""
    ordered = sorted(cases, key=lambda c: c.name)
    return ordered[index::count]
