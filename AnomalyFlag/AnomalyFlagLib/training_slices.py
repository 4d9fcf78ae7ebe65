"""Training and calibration inputs as slices: the cases' volumes preprocessed slice by slice (masked slices
left out), and their split into training and held-out parts."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .config import PreprocessConfig
from .errors import CancelledError, InputError
from .io.cases import Case
from .io.slice_source import open_source
from .orientation import relative_positions, slice_positions_mm
from .preprocessing import SlicePreprocessor, volume_reference
from .roi import RoiSlabs, roi_on_image_grid


@dataclass
class SliceSet:
    """Preprocessed slices (raw intensities as float16, (N, 1, S, S)) with their relative positions and case
    of origin."""

    images: torch.Tensor
    positions: torch.Tensor
    case_index: torch.Tensor
    slice_index: torch.Tensor  # index of the slice in its volume (neighbours differ by 1)
    case_names: List[str]
    excluded_slices: int = 0
    regions: Optional[torch.Tensor] = None  # (N, 1, S, S) bool: the case's segmentation plus margin, if it has one

    def __len__(self) -> int:
        return self.images.shape[0]

    def select(self, keep: torch.Tensor) -> "SliceSet":
        """The slices where the boolean mask `keep` is True."""
        regions = None if self.regions is None else self.regions[keep]
        return SliceSet(self.images[keep], self.positions[keep], self.case_index[keep], self.slice_index[keep],
                        self.case_names, regions=regions)  # fmt: skip

    def subset(self, cases: List[int]) -> "SliceSet":
        """The slices of the given cases."""
        return self.select(torch.isin(self.case_index, torch.as_tensor(cases)))


MASKED = ("exclude", "only", "ignore")


def load_slices(
    cases: List[Case],
    preprocess: PreprocessConfig,
    batch: int = 32,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    roi_labels: Optional[Sequence[int]] = None,
    roi_margin_mm: float = 10.0,
    masked: str = "exclude",
    only: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> SliceSet:
    """Read every case slab by slab into model-ready slices (raw intensities).

    A case's mask decides which slices are read: `masked` "exclude" leaves its slices out (normal scans),
    "only" reads just them (abnormal scans; every slice of a case without a mask), "ignore" reads all.
    `only[i]`, when given, lists the slices to read of case i. When a case has a segmentation, its
    `roi_labels` (None: any non-zero) dilated by `roi_margin_mm` are placed on the slices' model squares as
    `regions` (empty for cases without one), for the organ-aware calibration."""
    if masked not in MASKED:
        raise ValueError(f"masked must be one of {MASKED}, not '{masked}'")
    pre = SlicePreprocessor(preprocess)
    images, positions, owners, indices, excluded = [], [], [], [], 0
    with_regions = any(case.segmentation is not None for case in cases)
    regions = []
    for ci, case in enumerate(cases):
        if cancel is not None and cancel():
            raise CancelledError("loading of the training data was cancelled.")
        source = open_source(case.image, name=f"training volume '{case.image}'")
        try:
            keep = np.ones(source.num_slices, dtype=bool)
            if case.mask is not None and masked != "ignore":
                mask = roi_on_image_grid(case.mask, source.geometry, name=f"mask '{case.mask}'", allow_empty=True)
                marked = source.frame.view(mask).any(axis=(1, 2))
                keep = marked if masked == "only" else ~marked
            if only is not None and only[ci] is not None:
                listed = np.zeros(source.num_slices, dtype=bool)
                wanted = np.asarray(list(only[ci]), dtype=int)
                if wanted.size and (wanted.min() < 0 or wanted.max() >= source.num_slices):
                    raise InputError(f"'{case.image}' has {source.num_slices} slices; slices {wanted.tolist()} "
                                     "were asked for.")  # fmt: skip
                listed[wanted] = True
                keep &= listed
            organ = None
            if case.segmentation is not None:
                name = f"segmentation '{case.segmentation}'"
                organ = RoiSlabs(roi_on_image_grid(case.segmentation, source.geometry, roi_labels, name=name),
                                 source.geometry, roi_margin_mm)  # fmt: skip
            pos = relative_positions(slice_positions_mm(source.geometry, source.frame))
            frame = source.frame
            reference = volume_reference(source, preprocess)
            for k0 in range(0, source.num_slices, batch):
                k1 = min(source.num_slices, k0 + batch)
                slab = source.read(k0, k1)
                sel = keep[k0:k1]
                if sel.any():
                    x, placement = pre.to_model(slab[sel], frame.row_spacing, frame.column_spacing, reference)
                    images.append(x.half())
                    if with_regions:
                        region = torch.zeros(x.shape, dtype=torch.bool)
                        if organ is not None:
                            region = pre.mask_to_model(organ.slab(k0, k1)[torch.from_numpy(sel)], placement)
                        regions.append(region)
                    positions.append(torch.as_tensor(pos[k0:k1][sel], dtype=torch.float32))
                    owners.append(torch.full((int(sel.sum()),), ci, dtype=torch.long))
                    indices.append(torch.arange(k0, k1)[torch.from_numpy(sel)])
            source.check_not_constant()
            excluded += int((~keep).sum())
        finally:
            source.close()
        if progress is not None:
            progress(ci + 1, len(cases))
    if not images:
        raise InputError("no usable slices: every slice of every training volume is masked out." if masked != "only"
                         else "no usable slices: no training volume has a masked slice.")  # fmt: skip
    return SliceSet(torch.cat(images), torch.cat(positions), torch.cat(owners), torch.cat(indices),
                    [c.name for c in cases], excluded, torch.cat(regions) if with_regions else None)  # fmt: skip


VALIDATION_FRACTION = 0.2
"""Share of the training cases held out to calibrate, unless told otherwise (`train` and the held-out
recalibration must agree on it to split the same way)."""


def split_cases(num_cases: int, validation_fraction: float, seed: int):
    """Case indices for training and validation; validation never shares a case with training."""
    order = np.random.default_rng(seed).permutation(num_cases)
    n_val = int(round(num_cases * validation_fraction))
    if num_cases >= 3:
        n_val = max(1, n_val)
    n_val = min(n_val, num_cases - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def split_slices(slices: SliceSet, min_held_out: int = 20):
    """Slice-level split when no case can be held out: every 4th block of 4 slices to validation, or every
    2nd when that would hold out fewer than `min_held_out` slices."""
    every = 4 if len(slices) >= 4 * min_held_out else 2
    idx = torch.arange(len(slices))
    val = (idx // 4) % every == every - 1
    return slices.select(~val), slices.select(val)


def load_training_input(name: str, path, preprocess: PreprocessConfig, cancel=None) -> SliceSet:
    """The slices of a backend's training input besides the normal scans (`detectors.base.TrainingInput`)."""
    from .detectors.base import PATIENTS, UNLABELLED
    from .io.cases import discover_cases
    from .review.active_learning import confirmed_abnormal_slices

    if name == UNLABELLED.name:
        return load_slices(discover_cases(path, "unlabelled input"), preprocess, cancel=cancel, masked="ignore")
    if name == PATIENTS.name:
        reviewed = confirmed_abnormal_slices(path)
        if reviewed is not None:
            cases = [Case(image.name, image) for image in reviewed]
            return load_slices(cases, preprocess, cancel=cancel, masked="ignore", only=list(reviewed.values()))
        return load_slices(discover_cases(path, "patients input"), preprocess, cancel=cancel, masked="only")
    raise ValueError(f"unknown training input '{name}'")
