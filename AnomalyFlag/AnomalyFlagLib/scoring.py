"""Scoring a volume slice by slice: per-slice scores, calibrated flags and a compact heatmap.

Slices stream through in batches; the heatmap goes to a sink batch by batch (an in-memory uint8 array
or a gzip NRRD written as it comes), so working memory does not grow with the slice count.
"""

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import Bundle, load_bundle
from .calibration import describe_region, scan_level
from .devices import autocast_for, default_batch_size, select_device
from .distribution import distribution_warnings
from .errors import CancelledError, InputError
from .geometry import Geometry
from .io.scored_case import ArrayHeatmapSink
from .io.slice_source import SliceSource, open_source
from .maps import neighbour_max
from .orientation import relative_positions, slice_positions_mm
from .preprocessing import SlicePreprocessor, volume_reference
from .results import COLUMN_DESCRIPTIONS, HEATMAP_SCALE, CaseResult, SliceTable, slice_columns
from .roi import RoiSlabs, check_labels, roi_on_image_grid

ProgressFn = Callable[[int, int], None]


class Scorer:
    """A loaded model on a device, ready to score volumes one after another."""

    def __init__(self, model: Union[str, Path, Bundle], device: str = "auto", batch_size: Optional[int] = None):
        self.device = select_device(device)
        self.bundle = model if isinstance(model, Bundle) else load_bundle(model, device="cpu")
        self.bundle.to(self.device)
        self.bundle.threshold  # noqa: B018 - raises the "not calibrated" error early
        self.calibration = self.bundle.calibration
        size = self.bundle.preprocess.image_size
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch size must be at least 1, not {batch_size}.")
        self.batch_size = batch_size or default_batch_size(self.device, size)
        self.pre = SlicePreprocessor(self.bundle.preprocess)
        self.map_scorer = self.bundle.map_scorer()
        names = [c.name for c in self.bundle.components]
        self.columns = slice_columns(names)
        self.descriptions = {**COLUMN_DESCRIPTIONS, **{c.name: c.description for c in self.bundle.components}}
        area = self.bundle.scoring.score_area_mm2
        self.descriptions["score"] = f"mean of the most anomalous {area:g} mm2 of the normalised anomaly map"

    def score(
        self,
        volume: Union[str, Path, sitk.Image, np.ndarray, SliceSource],
        geometry: Optional[Geometry] = None,
        roi=None,
        roi_labels: Optional[Sequence[int]] = None,
        roi_margin_mm: float = 10.0,
        name: Optional[str] = None,
        heatmap_sink=None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[Callable[[], bool]] = None,
        slice_keeper=None,
    ) -> CaseResult:
        """Score every slice of `volume` (path, SimpleITK image, or (k, j, i) array with `geometry`).

        `roi` (segmentation or label map on the image grid, optionally `roi_labels`) restricts flags and
        the heatmap to that region plus `roi_margin_mm`. `progress(done, total)` is called after each
        batch; when `cancel()` returns True a CancelledError is raised and nothing is kept.
        `slice_keeper.offer(k0, image, heatmap, roi, scores)` sees every slab as it is scored (see
        io.montage.MontageSlices).
        """
        started = time.perf_counter()
        source = volume if isinstance(volume, SliceSource) else open_source(volume, geometry, name)
        name = name or source.name
        sink = heatmap_sink or ArrayHeatmapSink(source.geometry)
        try:
            result = self._score_source(source, sink, roi, roi_labels, roi_margin_mm, progress, cancel, slice_keeper)
            heatmap = sink.finish()
        except BaseException:
            sink.abort()
            raise
        finally:
            source.close()
        result.name = name
        result.heatmap = heatmap if isinstance(heatmap, np.ndarray) else None
        result.timings["total"] = round(time.perf_counter() - started, 3)
        return result

    def _organ_calibration(self, roi_slabs, roi_labels, roi_margin_mm):
        """(the organ-aware calibration to use or None, a note saying which score the ROI's slices get)."""
        organ = self.bundle.organ_calibration
        if roi_slabs is None:
            return None, None
        if organ is None:
            return None, "whole-body score: the model has no organ-aware calibration"
        if not organ.applies(roi_labels, roi_margin_mm):
            asked = describe_region(roi_labels, roi_margin_mm)
            return None, f"whole-body score: the organ-aware calibration is for {organ.describe()}, not for {asked}"
        return organ, f"organ-aware score of {organ.describe()}"

    def _score_source(self, source, sink, roi, roi_labels, roi_margin_mm, progress, cancel, keeper) -> CaseResult:
        geometry, frame = source.geometry, source.frame
        n = source.num_slices
        self.pre.check_fits(source.rows, source.columns, frame.row_spacing, frame.column_spacing, source.name)
        z_mm = slice_positions_mm(geometry, frame)
        positions = relative_positions(z_mm)
        roi_slabs = None
        if roi is not None:
            roi_labels = check_labels(roi_labels)
            mask = roi_on_image_grid(roi, geometry, roi_labels)
            roi_slabs = RoiSlabs(mask, geometry, roi_margin_mm)
        cal = self.calibration
        organ_cal, organ_note = self._organ_calibration(roi_slabs, roi_labels, roi_margin_mm)
        organ_scores = np.full(n, -np.inf)
        names = [c.name for c in self.bundle.components]
        values = {name: np.zeros(n) for name in names + ["score"]}
        frac, in_roi = np.zeros(n), np.zeros(n, dtype=bool)
        reference = volume_reference(source, self.bundle.preprocess)
        compute_s = 0.0
        for k0 in range(0, n, self.batch_size):
            if cancel is not None and cancel():
                raise CancelledError(f"scoring of {source.name} was cancelled at slice {k0} of {n}.")
            k1 = min(n, k0 + self.batch_size)
            slab = source.read(k0, k1)
            t0 = time.perf_counter()
            x, placement = self.pre.to_model(slab, frame.row_spacing, frame.column_spacing, reference)
            x = x.to(self.device)
            body = self.pre.body_mask(x)
            pos = torch.as_tensor(positions[k0:k1], dtype=torch.float32, device=self.device)
            with torch.no_grad():
                with autocast_for(self.device):
                    raw = self.bundle.backend.maps(x, pos, body)
                scores = self.map_scorer(raw, pos, body)  # normalised and pooled in float32
            values["score"][k0:k1] = scores.score.float().cpu().numpy()
            for name in names:
                values[name][k0:k1] = scores.components[name].float().cpu().numpy()
            if organ_cal is not None:
                region_model = self.pre.mask_to_model(roi_slabs.slab(k0, k1), placement).to(self.device)
                organ_scores[k0:k1] = self.map_scorer.pool(scores.pixel_map.float() * region_model[:, 0]).cpu().numpy()
            maps = torch.cat([scores.pixel_map.float() / cal.pixel_threshold, body[:, 0].float()]).cpu()
            grid = self.pre.to_slice_grid(maps, placement, source.rows, source.columns)
            index, region = grid[: k1 - k0], grid[k1 - k0 :] > 0.5
            if roi_slabs is not None:
                region = roi_slabs.slab(k0, k1)
                in_roi[k0:k1] = region.any(dim=(1, 2)).numpy()
                index = index * region
            else:
                in_roi[k0:k1] = True
            counts = region.sum(dim=(1, 2)).clamp_min(1)
            frac[k0:k1] = (((index > 1.0) & region).sum(dim=(1, 2)) / counts).numpy()
            heat = torch.clamp(torch.round(index / HEATMAP_SCALE), 0, 255).to(torch.uint8).numpy()
            sink.write(k0, heat)
            if keeper is not None:  # ranked as the flags will be: by the score in use, never outside the ROI
                own = cal.normalise(values["score"][k0:k1], positions[k0:k1])
                if organ_cal is not None:
                    own = organ_cal.normalise(organ_scores[k0:k1], positions[k0:k1])
                own = np.where(in_roi[k0:k1], own, -np.inf)
                keeper.offer(k0, slab, heat, None if roi_slabs is None else roi_slabs.view[k0:k1], own)
            compute_s += time.perf_counter() - t0
            if progress is not None:
                progress(k1, n)
        source.check_not_constant()
        context, score_from = neighbour_max(values["score"], np.zeros(n), np.arange(n),
                                            self.bundle.scoring.neighbour_slices)  # fmt: skip
        normalised = cal.normalise(context, positions)
        score, threshold, kind = values["score"], cal.threshold, np.full(n, "body", dtype="<U5")
        if organ_cal is not None:  # inside the ROI the organ-aware score and its own calibration
            organ_context, organ_from = neighbour_max(np.where(in_roi, organ_scores, -np.inf), np.zeros(n),
                                                      np.arange(n), self.bundle.scoring.neighbour_slices)  # fmt: skip
            normalised = np.where(in_roi, organ_cal.normalise(organ_context, positions), normalised)
            score = np.where(in_roi, organ_scores, score)
            score_from = np.where(in_roi, organ_from, score_from)
            kind[in_roi] = "organ"
            threshold = organ_cal.threshold
        level = scan_level(normalised[in_roi]) if self.bundle.scoring.relative_to_scan else 0.0
        warnings = distribution_warnings(self.bundle.preprocess.modality, source.value_range[0], normalised,
                                         threshold, in_roi)  # fmt: skip
        normalised = normalised - level
        flagged = (normalised > threshold) & in_roi
        frac = np.where(in_roi, frac, np.nan)
        columns = {"index": np.arange(n), "z_mm": np.round(z_mm, 3), "position": np.round(positions, 4)}
        columns.update({name: values[name] for name in names})
        columns.update({"score": score, "score_from": score_from, "normalised": normalised, "flagged": flagged,
                        "in_roi": in_roi, "anomaly_fraction": frac, "score_kind": kind})  # fmt: skip
        table = SliceTable({c: columns[c] for c in self.columns}, self.descriptions)
        roi_info = None
        if roi_slabs is not None:
            roi_info = {"labels": list(roi_labels) if roi_labels else "any non-zero", "margin_mm": roi_margin_mm,
                        "slices": [int(roi_slabs.extent[0]), int(roi_slabs.extent[1])],
                        "score_kind": "organ" if organ_cal is not None else "body", "score": organ_note}  # fmt: skip
        return CaseResult(
            name=source.name,
            geometry=geometry,
            slices=table,
            threshold=threshold,
            model_name=self.bundle.name,
            model_fingerprint=self.bundle.fingerprint(),
            roi=roi_info,
            timings={"compute": round(compute_s, 3)},
            device=str(self.device),
            warnings=warnings,
            scan_level=level,
        )
