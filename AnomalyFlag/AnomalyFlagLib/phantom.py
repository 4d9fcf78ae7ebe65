"""Procedural abdominal CT phantom with labelled anomalies, for tests, demos and evaluation.

``make_phantom`` draws a contrast-enhanced abdominal CT (portal-venous look) in Hounsfield units: body
outline with subcutaneous fat and an abdominal wall, bowel and mesenteric fat, liver, spleen, kidneys
(enhanced cortex, medulla, perirenal fat), stomach with an air-fluid level, aorta, IVC, vertebrae with
discs, ribs, paraspinal muscles and lung bases in the top slices. The anatomy is laid out in coordinates
normalised to the field of view (the body fills about 85% of the width whatever the matrix size or
spacing), changes smoothly along z (slice 0 is the most inferior, as with an identity direction in
LPS) and varies between subjects with the seed. Gaussian noise, correlated in-plane, is added last.

``insert_anomaly`` adds one anomaly to ANY CT volume (a phantom or a real scan) and returns the exact
mask of what it changed; ``make_phantom(anomalies=[...])`` uses it with organ-appropriate regions.

Array order is numpy's (z, y, x); spacing is given as (x, y, z) mm, as in SimpleITK.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .atomic_files import atomic_path
from .io.volumes import write_image_atomic

ORGAN_LABELS: Dict[str, int] = {
    "background": 0,
    "body": 1,
    "liver": 2,
    "spleen": 3,
    "kidney_left": 4,
    "kidney_right": 5,
    "bone": 6,
    "aorta": 7,
}

ANOMALY_KINDS = ("hypodense_lesion", "hyperdense_lesion", "metal_stent", "fluid")

# A voxel counts as materially changed (and so is in a streak mask) above this absolute change.
MATERIAL_CHANGE_HU = 50.0

HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "muscle": 45.0,
    "bowel": 30.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 150.0,
    "kidney_medulla": 90.0,
    "aorta": 200.0,
    "ivc": 120.0,
    "stomach_fluid": 15.0,
    "bone_cancellous": 400.0,
    "bone_cortical": 950.0,
    "disc": 80.0,
    "csf": 15.0,
    "rib": 750.0,
}

Spacing = Tuple[float, float, float]


@dataclass
class Phantom:
    """A generated CT volume with its anomaly mask and organ label map, all (z, y, x)."""

    image: np.ndarray
    anomaly_mask: np.ndarray
    organs: np.ndarray
    spacing: Spacing
    anomalies: List[dict] = field(default_factory=list)
    seed: int = 0

    @property
    def origin(self) -> Spacing:
        """LPS origin (mm) that centres the volume on 0 with an identity direction."""
        shape_xyz = self.image.shape[::-1]
        return tuple(-(n - 1) * s / 2.0 for n, s in zip(shape_xyz, self.spacing))

    def to_sitk(self, array: Optional[np.ndarray] = None) -> sitk.Image:
        """SimpleITK image of ARRAY (default: the CT image) with this phantom's geometry."""
        array = self.image if array is None else array
        if array.shape != self.image.shape:
            raise ValueError(f"array shape {array.shape} differs from the phantom's {self.image.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(self.origin)
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return image

    def save(self, folder, name: str) -> Dict[str, Path]:
        """Write <name>.nrrd (int16 HU), <name>_anomaly.nrrd and <name>_organs.nrrd (uint8), compressed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "image": folder / f"{name}.nrrd",
            "anomaly": folder / f"{name}_anomaly.nrrd",
            "organs": folder / f"{name}_organs.nrrd",
        }
        arrays = {
            "image": self.image.astype(np.int16, copy=False),
            "anomaly": self.anomaly_mask.astype(np.uint8, copy=False),
            "organs": self.organs.astype(np.uint8, copy=False),
        }
        for key, path in paths.items():
            write_image_atomic(self.to_sitk(arrays[key]), path)
        return paths


# ----------------------------------------------------------------------------------------------------
# Small numpy helpers (no scipy)


def _smooth_inplane(volume: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 binomial filter along y and x (edge-replicated), in place on a float array."""
    for axis in (1, 2):
        padded = np.concatenate([np.take(volume, [0], axis=axis), volume, np.take(volume, [-1], axis=axis)], axis=axis)
        n = volume.shape[axis]
        left = np.take(padded, np.arange(0, n), axis=axis)
        right = np.take(padded, np.arange(2, n + 2), axis=axis)
        volume *= 0.5
        volume += 0.25 * (left + right)
    return volume


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights (n_out, n_in) spreading n_in control points over n_out samples."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    weights[np.arange(n_out), lo] = 1.0 - frac
    if n_in > 1:
        weights[np.arange(n_out), lo + 1] += frac
    return weights


class _SmoothField:
    """A smooth random 3D field on a coarse grid, evaluated on any z-chunk of the full grid."""

    def __init__(self, rng: np.random.Generator, shape: Tuple[int, int, int], grid: Tuple[int, int, int]):
        self.coarse = rng.standard_normal(grid).astype(np.float32)
        self.wz = _interp_matrix(shape[0], grid[0])
        self.wy = _interp_matrix(shape[1], grid[1])
        self.wx = _interp_matrix(shape[2], grid[2])

    def chunk(self, k0: int, k1: int, rows: slice = slice(None)) -> np.ndarray:
        a = np.tensordot(self.wz[k0:k1], self.coarse, axes=(1, 0))  # (nz, gy, gx)
        nz, gy, gx = a.shape
        wy = self.wy[rows]
        a = (wy @ a.transpose(1, 0, 2).reshape(gy, nz * gx)).reshape(len(wy), nz, gx).transpose(1, 0, 2)
        out = np.ascontiguousarray(a).reshape(-1, gx) @ self.wx.T  # (nz * ny, nx)
        return out.reshape(nz, len(wy), -1)


def _profile(t: np.ndarray, start: float, end: float) -> np.ndarray:
    """Organ size along z: 0 outside [start, end], a smooth dome (max 1) inside."""
    mid, half = (start + end) / 2.0, max((end - start) / 2.0, 1e-6)
    return np.sqrt(np.clip(1.0 - ((t - mid) / half) ** 2, 0.0, None))


def _ellipse_r(x, y, cx, cy, ax, ay, angle=0.0, power=2.0):
    """Normalised (super)elliptic radius; < 1 inside. Sizes may be arrays broadcast along z."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    ax = np.maximum(ax, 1e-6)
    ay = np.maximum(ay, 1e-6)
    if power == 2.0:
        return np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    return (np.abs(dx / ax) ** power + np.abs(dy / ay) ** power) ** (1.0 / power)


# ----------------------------------------------------------------------------------------------------
# Subject parameters


def _subject(rng: np.random.Generator) -> dict:
    def n(scale):
        return float(rng.normal(0.0, scale))

    def u(a, b):
        return float(rng.uniform(a, b))

    return {
        "body_a": u(0.78, 0.9),
        "body_b": u(0.5, 0.62),
        "body_taper": u(-0.06, 0.06),
        "fat": u(0.05, 0.13),
        "wall": u(0.03, 0.045),
        "liver_scale": 1.0 + n(0.07),
        "liver_dx": n(0.02),
        "liver_dy": n(0.02),
        "liver_start": u(0.25, 0.38),
        "spleen_scale": 1.0 + n(0.1),
        "spleen_start": u(0.5, 0.6),
        "kidney_scale": 1.0 + n(0.07),
        "kidney_dz": n(0.04),
        "kidney_dy": n(0.02),
        "aorta_r": u(0.045, 0.06),
        "spine_r": u(0.1, 0.12),
        "disc_phase": u(0.0, 1.0),
        "disc_period_mm": u(30.0, 36.0),
        "hu_shift": n(5.0),
        "liver_hu": HU["liver"] + n(5.0),
        "spleen_hu": HU["spleen"] + n(5.0),
        "noise": u(10.0, 20.0),
        "lung_start": u(0.8, 0.9),
    }


# ----------------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """Image and label slabs plus normalised coordinates; paints shapes within their bounding boxes."""

    def __init__(self, k0, k1, shape):
        nz, ny, nx = shape
        z = np.arange(k0, k1, dtype=np.float32)
        self.t = (z / max(nz - 1, 1)).reshape(-1, 1, 1) if nz > 1 else np.full((k1 - k0, 1, 1), 0.5, np.float32)
        self.z = z.reshape(-1, 1, 1)
        self.y = np.linspace(-1.0, 1.0, ny, dtype=np.float32).reshape(1, -1, 1)
        self.x = np.linspace(-1.0, 1.0, nx, dtype=np.float32).reshape(1, 1, -1)
        self.ny, self.nx = ny, nx
        self.img = np.full((k1 - k0, ny, nx), HU["air"], dtype=np.float32)
        self.lab = np.zeros((k1 - k0, ny, nx), dtype=np.uint8)

    def box(self, cx, cy, ex, ey):
        """Index slices (y, x) covering centre(s) CX, CY (normalised) +- extents EX, EY."""

        def span(c, e, n):
            lo = float(np.min(c - e)) if np.ndim(c) or np.ndim(e) else c - e
            hi = float(np.max(c + e)) if np.ndim(c) or np.ndim(e) else c + e
            i0 = int(math.floor((lo + 1.0) / 2.0 * (n - 1))) - 1
            i1 = int(math.ceil((hi + 1.0) / 2.0 * (n - 1))) + 2
            return slice(min(max(i0, 0), n), min(max(i1, 0), n))

        return span(cy, ey, self.ny), span(cx, ex, self.nx)

    def ellipse(self, cx, cy, ax, ay, angle=0.0, power=2.0):
        """(box, r): normalised radius of an ellipse over its bounding box (rotation-safe extent)."""
        ext = np.maximum(ax, ay) if angle else None
        ys, xs = self.box(cx, cy, ax if ext is None else ext, ay if ext is None else ext)
        r = _ellipse_r(self.x[:, :, xs], self.y[:, ys, :], cx, cy, ax, ay, angle, power)
        return (slice(None), ys, xs), r

    def paint(self, box, value, where, label=None):
        np.copyto(self.img[box], value, where=where)
        if label is not None:
            np.copyto(self.lab[box], label, where=where)


def _render_chunk(k0, k1, shape, spacing, p, bowel_field, gas_field):
    """Clean HU image (float32) and organ labels (uint8) for slices k0..k1-1."""
    cv = _Canvas(k0, k1, shape)
    t, x, y = cv.t, cv.x, cv.y
    img, lab = cv.img, cv.lab

    # Body: a superellipse, wider over the rib cage, a little narrower at the waist, flatter behind.
    power = 2.4
    a = p["body_a"] * (1.0 + p["body_taper"] * (t - 0.5) + 0.04 * np.cos(2.0 * np.pi * t))
    b = p["body_b"] * (1.0 + 0.03 * np.sin(np.pi * t))
    cy_body = 0.04
    yp = np.abs(y - cy_body) ** power * np.where(y > cy_body, 0.92**-power, 1.0)
    rp_body = np.abs(x) ** power / a**power + yp / b**power  # r ** power
    body = rp_body < 1.0
    fat_in = 1.0 - p["fat"] * (1.0 + 0.6 * (y < cy_body))  # thicker fat in front
    wall_in = fat_in - p["wall"]
    cv.paint(Ellipsis, HU["fat"], body, ORGAN_LABELS["body"])
    cv.paint(Ellipsis, HU["muscle"], rp_body < fat_in**power)
    cavity = rp_body < wall_in**power

    # Bowel loops in mesenteric fat, with a little gas anteriorly.
    bowel = bowel_field.chunk(k0, k1)
    content = np.where(bowel > 0.1, HU["bowel"] + 8.0 * bowel, HU["fat"] + 10.0 * bowel)
    front = slice(0, int(np.searchsorted(y.ravel(), 0.1)))
    gas = (gas_field.chunk(k0, k1, rows=front) > 2.0) & (bowel[:, front] > 0.4)
    np.copyto(content[:, front], -900.0, where=gas)
    np.copyto(img, content, where=cavity)

    def inside(box, r, *extra):
        m = (r < 1.0) & cavity[box]
        for e in extra:
            m &= e
        return m

    # Paraspinal muscles (erector spinae) and psoas (grows inferiorly).
    spine_y = cy_body + 0.72 * p["body_b"] * 0.92 - 0.25 * p["spine_r"]
    psoas = np.clip((0.55 - t) / 0.55, 0.0, 1.0)
    for side in (-1.0, 1.0):
        box, r = cv.ellipse(side * 0.16, spine_y + 0.17, 0.12, 0.09)
        cv.paint(box, HU["muscle"], (r < 1.0) & body[box])
        if psoas.max() > 0.05:
            box, r = cv.ellipse(side * 0.15, spine_y - 0.03, 0.07 * psoas + 1e-3, 0.08 * psoas + 1e-3)
            cv.paint(box, HU["muscle"], inside(box, r, psoas > 0.05))

    # Lung bases at the top, behind and beside the liver and spleen dome.
    lung = np.clip((t - p["lung_start"]) / (1.0 - p["lung_start"] + 1e-6), 0.0, 1.0)
    if lung.max() > 0.02:
        for side in (-1.0, 1.0):
            box, r = cv.ellipse(side * 0.4 * a / 0.85, 0.3, 0.3 * lung + 1e-3, 0.26 * lung + 1e-3)
            cv.paint(box, HU["lung"], inside(box, r, lung > 0.02, y[:, box[1]] > 0.05))

    # Stomach (upper left, anterior) with an air-fluid level.
    prof = _profile(t, 0.6, 1.02)
    if prof.max() > 0.05:
        box, r = cv.ellipse(0.3, -0.2, 0.2 * prof + 1e-3, 0.15 * prof + 1e-3, angle=0.4)
        cv.paint(box, HU["muscle"], inside(box, r))
        inner = inside(box, r / 0.82)
        level = y[:, box[1]] < -0.2 - 0.04 * prof
        cv.paint(box, np.where(level, -950.0, HU["stomach_fluid"]), inner)

    # Liver: right lobe (patient right = -x) plus a left lobe across the midline in upper slices.
    prof = _profile(t, p["liver_start"], 1.12) * p["liver_scale"]
    if prof.max() > 0.05:
        tip = np.clip((t - p["liver_start"]) / 0.3, 0.0, 1.0)  # inferior tip sits lateral and posterior
        cx_l = -0.38 * a / 0.85 + p["liver_dx"] + 0.08 * (1.0 - tip)
        cy_l = 0.02 + p["liver_dy"] + 0.08 * (1.0 - tip)
        box, r = cv.ellipse(cx_l, cy_l, 0.36 * prof, 0.4 * prof, 0.2, 2.3)
        cv.paint(box, p["liver_hu"], inside(box, r, prof > 0.05), ORGAN_LABELS["liver"])
        left_lobe = _profile(t, 0.62, 1.1) * p["liver_scale"]
        if left_lobe.max() > 0.05:
            box, r = cv.ellipse(-0.05, -0.2, 0.34 * left_lobe + 1e-3, 0.14 * left_lobe + 1e-3, -0.15)
            cv.paint(box, p["liver_hu"], inside(box, r, left_lobe > 0.05), ORGAN_LABELS["liver"])

    # Spleen: left posterior, upper slices.
    prof = _profile(t, p["spleen_start"], 1.05) * p["spleen_scale"]
    if prof.max() > 0.05:
        box, r = cv.ellipse(0.52 * a / 0.85, 0.22, 0.12 * prof + 1e-3, 0.2 * prof + 1e-3, -0.6)
        cv.paint(box, p["spleen_hu"], inside(box, r, prof > 0.05), ORGAN_LABELS["spleen"])

    # Kidneys: perirenal fat, enhanced cortex, medulla, hilar fat; the right one sits a little lower.
    for side, name, dz in ((1.0, "kidney_left", 0.03), (-1.0, "kidney_right", -0.03)):
        prof = _profile(t, 0.12 + dz + p["kidney_dz"], 0.55 + dz + p["kidney_dz"]) * p["kidney_scale"]
        if prof.max() <= 0.05:
            continue
        present = prof > 0.05
        cx_k, cy_k = side * 0.3, spine_y - 0.02 + p["kidney_dy"]
        ang = side * 0.5
        box, r_fat = cv.ellipse(cx_k, cy_k, 0.14 * prof + 1e-3, 0.18 * prof + 1e-3, ang)
        cv.paint(box, HU["fat"], inside(box, r_fat, present, lab[box] == ORGAN_LABELS["body"]))
        r = _ellipse_r(x[:, :, box[2]], y[:, box[1]], cx_k, cy_k, 0.09 * prof + 1e-3, 0.13 * prof + 1e-3, ang)
        kidney = inside(box, r, present)
        cv.paint(box, HU["kidney_cortex"], kidney, ORGAN_LABELS[name])
        cv.paint(box, HU["kidney_medulla"], kidney & (r < 0.6))
        hilum = _ellipse_r(
            x[:, :, box[2]],
            y[:, box[1]],
            cx_k - side * 0.07 * prof,
            cy_k - 0.02,
            0.04 * prof + 1e-3,
            0.05 * prof + 1e-3,
        )
        cv.paint(box, HU["fat"], kidney & (hilum < 1.0))

    # Great vessels in front of the spine.
    box, r = cv.ellipse(-0.11, spine_y - p["spine_r"] - 0.09, 0.06, 0.05)
    cv.paint(box, HU["ivc"], inside(box, r, lab[box] == ORGAN_LABELS["body"]))
    box, r = cv.ellipse(0.05, spine_y - p["spine_r"] - 0.07, p["aorta_r"], p["aorta_r"])
    cv.paint(box, HU["aorta"], inside(box, r), ORGAN_LABELS["aorta"])

    # Vertebra: cancellous body with a cortical rim, discs at a regular spacing, canal, posterior arch.
    z_mm = cv.z * spacing[2]
    disc = np.mod(z_mm / p["disc_period_mm"] + p["disc_phase"], 1.0) < 0.18
    sr = p["spine_r"]
    box, r = cv.ellipse(0.0, spine_y, sr * 1.05, sr)
    vert = r < 1.0
    bone = np.where(r > 0.75, HU["bone_cortical"], HU["bone_cancellous"])
    cv.paint(box, np.where(disc, HU["disc"], bone), vert)
    np.copyto(lab[box], ORGAN_LABELS["bone"], where=vert & ~disc)
    box, r = cv.ellipse(0.0, spine_y + sr + 0.12, 0.09, 0.14)  # covers arch, canal and spinous process
    xb, yb = x[:, :, box[2]], y[:, box[1]]
    canal = _ellipse_r(xb, yb, 0.0, spine_y + sr + 0.05, 0.05, 0.045) < 1.0
    arch = (_ellipse_r(xb, yb, 0.0, spine_y + sr + 0.06, 0.09, 0.07) < 1.0) & ~canal
    spinous = _ellipse_r(xb, yb, 0.0, spine_y + sr + 0.16, 0.025, 0.08) < 1.0
    cv.paint(box, HU["bone_cortical"] - 150.0, (arch | spinous) & ~disc, ORGAN_LABELS["bone"])
    cv.paint(box, HU["csf"], canal)

    # Ribs in the abdominal wall of the upper slices.
    rib_level = np.clip((t - 0.45) / 0.2, 0.0, 1.0)
    ribbed = np.flatnonzero(rib_level.ravel() > 0.5)
    if len(ribbed):
        sel = slice(int(ribbed[0]), int(ribbed[-1]) + 1)
        rib_r = 0.5 * (fat_in + wall_in)
        rp = rp_body[sel]
        zi, yi, xi = np.nonzero((rp > (rib_r - 0.03) ** power) & (rp < (rib_r + 0.03) ** power))
        ratio = (a[sel] / b[sel]).ravel()[zi]
        theta = np.arctan2(y.ravel()[yi] - cy_body, x.ravel()[xi] / ratio) - 0.15 * np.sin(6.0 * t[sel].ravel()[zi])
        on_rib = np.zeros(len(zi), dtype=bool)
        for k in range(-5, 6):
            if k == 0:
                continue
            ang = np.pi / 2.0 + np.sign(k) * (0.55 + 0.28 * (abs(k) - 1))
            on_rib |= np.abs(np.mod(theta - ang + np.pi, 2.0 * np.pi) - np.pi) < 0.07
        zi, yi, xi = zi[on_rib] + sel.start, yi[on_rib], xi[on_rib]
        img[zi, yi, xi] = HU["rib"]
        lab[zi, yi, xi] = ORGAN_LABELS["bone"]

    img[body] += p["hu_shift"]
    wall_band = cavity & (rp_body > np.clip(wall_in - 0.15, 0.0, None) ** power)  # just inside the wall
    return img, lab, wall_band


def _region_for(kind: str, organs: np.ndarray, wall_band: np.ndarray, rng: np.random.Generator):
    """Where an anomaly of KIND goes in a phantom: (region mask, region name)."""
    if kind in ("hypodense_lesion", "hyperdense_lesion"):
        names = ["liver", "spleen", "kidney_left", "kidney_right"]
        weights = np.array([0.55, 0.15, 0.15, 0.15])
        counts = np.array([np.count_nonzero(organs == ORGAN_LABELS[n]) for n in names], dtype=float)
        weights = weights * (counts > 50)
        if weights.sum() == 0:
            return organs > 0, "body"
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        return organs == ORGAN_LABELS[name], name
    if kind == "metal_stent":
        aorta = organs == ORGAN_LABELS["aorta"]
        return (aorta, "aorta") if aorta.any() else (organs > 0, "body")
    if kind == "fluid":
        region = wall_band & ((organs == ORGAN_LABELS["body"]) | (organs == ORGAN_LABELS["liver"]))
        return region, "peritoneum"
    raise ValueError(f"unknown anomaly kind '{kind}'; choose from {', '.join(ANOMALY_KINDS)}")


def make_phantom(
    num_slices: int = 64,
    size: int = 128,
    spacing: Spacing = (1.5, 1.5, 3.0),
    seed: int = 0,
    anomalies: Sequence[Union[str, dict]] = (),
) -> Phantom:
    """Generate an abdominal CT phantom, deterministic for a seed.

    ANOMALIES: kinds from ANOMALY_KINDS, or dicts {"kind": ..., optional "radius_mm": ...,
    optional "region": organ name from ORGAN_LABELS}. Lesions go into the liver, spleen or a kidney,
    a stent into the aorta, fluid along the abdominal wall (around the liver when it lies there). Lesions
    and stents keep the organ labels (a liver lesion is part of the liver contour); fluid voxels are
    labelled body, whatever organ they displaced, so the liver label is the liver a contour should follow.
    """
    if num_slices < 1 or size < 16:
        raise ValueError("num_slices must be >= 1 and size >= 16")
    spacing = tuple(float(s) for s in spacing)
    rng = np.random.default_rng(seed)
    params = _subject(rng)
    shape = (int(num_slices), int(size), int(size))
    grid_z = max(2, int(round(num_slices * spacing[2] / 25.0)) + 2)
    bowel_field = _SmoothField(rng, shape, (grid_z, 14, 14))
    gas_field = _SmoothField(rng, shape, (grid_z, 20, 20))

    image = np.empty(shape, dtype=np.float32)
    organs = np.empty(shape, dtype=np.uint8)
    wall_band = np.empty(shape, dtype=bool)  # peritoneal cavity just inside the abdominal wall
    chunk = max(1, int(4_000_000 // (size * size)))
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        img, lab, cav = _render_chunk(k0, k1, shape, spacing, params, bowel_field, gas_field)
        image[k0:k1] = _smooth_inplane(img)
        organs[k0:k1] = lab
        wall_band[k0:k1] = cav

    mask = np.zeros(shape, dtype=np.uint8)
    inserted = []
    anomaly_rng = np.random.default_rng([seed, 1])
    for item in anomalies:
        spec = {"kind": item} if isinstance(item, str) else dict(item)
        kind = spec["kind"]
        if "region" in spec:
            region, region_name = organs == ORGAN_LABELS[spec["region"]], spec["region"]
        else:
            region, region_name = _region_for(kind, organs, wall_band, anomaly_rng)
        image, one_mask, info = _insert(
            image, kind, anomaly_rng, region, spacing, spec.get("radius_mm"), body_threshold=-500.0
        )
        mask |= one_mask
        if kind == "fluid":  # fluid displaces the tissue it fills: the organ map says peritoneal cavity there
            organs[one_mask.astype(bool)] = ORGAN_LABELS["body"]
        info["region"] = region_name
        inserted.append(info)

    noise_rng = np.random.default_rng([seed, 2])
    sigma = params["noise"]
    body = organs > 0
    out = np.empty(shape, dtype=np.int16)
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        noise = noise_rng.standard_normal((k1 - k0, size, size), dtype=np.float32)
        noise = _smooth_inplane(noise) * (sigma / 0.375)
        noise[~body[k0:k1]] *= 0.3  # little noise in air
        slab = image[k0:k1] + noise
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[k0:k1] = slab
    return Phantom(out, mask, organs, spacing, inserted, seed)


# ----------------------------------------------------------------------------------------------------
# Anomaly insertion


def _bbox(centre, radii_vox, shape):
    return tuple(
        slice(max(0, int(math.floor(c - r)) - 1), min(n, int(math.ceil(c + r)) + 2))
        for c, r, n in zip(centre, radii_vox, shape)
    )


def _grids(box, centre, spacing_zyx):
    """Physical offsets (mm) from CENTRE over BOX, broadcastable (z, y, x)."""
    return [
        ((np.arange(s.start, s.stop, dtype=np.float32) - c) * d).reshape([-1 if i == a else 1 for i in range(3)])
        for a, (s, c, d) in enumerate(zip(box, centre, spacing_zyx))
    ]


def _sample_centre(candidates: np.ndarray, shape, rng) -> Tuple[int, int, int]:
    flat = candidates[rng.integers(len(candidates))]
    return tuple(int(v) for v in np.unravel_index(flat, shape))


def _body_ellipse(slab: np.ndarray, threshold: float):
    """Per-slice body centroid and semi-axes (y, x) in voxels from the second moments of HU > threshold."""
    body = slab > threshold
    rows = body.sum(axis=2, dtype=np.float64)  # (nz, ny)
    cols = body.sum(axis=1, dtype=np.float64)  # (nz, nx)
    yy = np.arange(slab.shape[1], dtype=np.float64)
    xx = np.arange(slab.shape[2], dtype=np.float64)
    n = np.maximum(rows.sum(axis=1), 1.0)
    cy = (rows @ yy) / n
    cx = (cols @ xx) / n
    ay = 2.0 * np.sqrt(np.einsum("zy,zy->z", rows, (yy[None, :] - cy[:, None]) ** 2) / n) + 1.0
    ax = 2.0 * np.sqrt(np.einsum("zx,zx->z", cols, (xx[None, :] - cx[:, None]) ** 2) / n) + 1.0
    return tuple(v.reshape(-1, 1, 1) for v in (cy, cx, ay, ax))


def _insert(image, kind, rng, region_mask, spacing, radius_mm, body_threshold=-500.0):
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"unknown anomaly kind '{kind}'; choose from {', '.join(ANOMALY_KINDS)}")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D (z, y, x), got shape {image.shape}")
    shape = image.shape
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be three positive numbers (x, y, z) mm, got {spacing}")
    spacing_zyx = (sp[2], sp[1], sp[0])
    if region_mask is not None:
        region_mask = np.asarray(region_mask).astype(bool, copy=False)
        if region_mask.shape != shape:
            raise ValueError(f"region_mask shape {region_mask.shape} differs from image shape {shape}")
        candidate_mask = region_mask
    else:
        candidate_mask = image > body_threshold
    candidates = np.flatnonzero(candidate_mask)
    if len(candidates) == 0:
        raise ValueError(f"no voxel to place a {kind} in: the region (or the body, HU > {body_threshold}) is empty")

    is_int = np.issubdtype(image.dtype, np.integer)
    out = image.copy()
    mask = np.zeros(shape, dtype=np.uint8)
    info = {"kind": kind}

    def write(box, new_values, changed):
        """Store NEW_VALUES into OUT[box] (rounded and clipped for integer images)."""
        if is_int:
            limits = np.iinfo(image.dtype)
            new_values = np.clip(np.rint(new_values), limits.min, limits.max)
        out[box] = np.where(changed, new_values, out[box]).astype(image.dtype)

    if kind in ("hypodense_lesion", "hyperdense_lesion"):
        radius = float(radius_mm) if radius_mm is not None else float(rng.uniform(6.0, 15.0))
        radii = np.array([radius * rng.uniform(0.8, 1.2) for _ in range(3)])
        radii = np.maximum(radii, np.array(spacing_zyx) * 0.75)
        radii_vox = radii / np.array(spacing_zyx)
        best = None
        for _ in range(20):  # prefer a centre where the lesion lies (mostly) inside the region
            centre = _sample_centre(candidates, shape, rng)
            box = _bbox(centre, radii_vox * 1.2, shape)
            gz, gy, gx = _grids(box, centre, spacing_zyx)
            r = np.sqrt((gz / radii[0]) ** 2 + (gy / radii[1]) ** 2 + (gx / radii[2]) ** 2)
            inside = r <= 1.0
            frac = 1.0 if region_mask is None else float(region_mask[box][inside].mean())
            if best is None or frac > best[0]:
                best = (frac, centre, box, r)
            if frac >= 0.9:
                break
        _, centre, box, r = best
        allowed = np.ones(r.shape, bool) if region_mask is None else region_mask[box]
        allowed = allowed & (image[box] > body_threshold)
        lesion = (r <= 1.0) & allowed
        old = image[box].astype(np.float32)
        reference = float(np.median(old[lesion])) if lesion.any() else float(old.flat[0])
        if kind == "hypodense_lesion":
            delta = min(float(rng.uniform(10.0, 30.0)), reference - 30.0) - reference
        else:
            delta = float(rng.uniform(80.0, 120.0))
        edge = 0.15
        weight = np.clip((1.0 + edge / 2.0 - r) / edge, 0.0, 1.0) * allowed
        write(box, old + weight * delta, weight > 0)
        mask[box] = lesion
        info.update(delta_hu=round(delta, 1), radius_mm=[round(float(v), 2) for v in radii[::-1]])
    elif kind == "metal_stent":
        centre = _sample_centre(candidates, shape, rng)
        radius = float(radius_mm) if radius_mm is not None else float(rng.uniform(2.0, 3.5))
        radius = max(radius, 0.5 * min(sp[0], sp[1]))
        half_len = float(rng.uniform(15.0, 40.0))
        metal_hu = float(rng.uniform(2500.0, 3000.0))
        amplitude = float(rng.uniform(250.0, 400.0))
        decay = float(rng.uniform(12.0, 20.0))
        n_rays = int(rng.integers(6, 12))
        phase = float(rng.uniform(0.0, 2.0 * np.pi))
        reach = radius + decay * math.log(amplitude)  # streaks below 1 HU beyond this
        radii_vox = (half_len / spacing_zyx[0], reach / spacing_zyx[1], reach / spacing_zyx[2])
        box = _bbox(centre, radii_vox, shape)
        gz, gy, gx = _grids(box, centre, spacing_zyx)
        in_z = np.abs(gz) <= half_len
        rho = np.sqrt(gy**2 + gx**2)
        metal = in_z & (rho <= radius)
        theta = np.arctan2(gy, gx)
        ray = np.cos(n_rays * theta + phase + 0.05 * gz)
        streak = np.sign(ray) * np.abs(ray) ** 3 + 0.5 * np.cos(2.0 * theta)
        streak = amplitude * streak * np.exp(-np.clip(rho - radius, 0.0, None) / decay)
        old = image[box].astype(np.float32)
        body = old > body_threshold
        new = np.where(metal, metal_hu, old + np.where(in_z & body, streak, 0.0))
        write(box, new, metal | (in_z & body))
        changed = metal | (np.abs(out[box].astype(np.float32) - old) > MATERIAL_CHANGE_HU)
        mask[box] = changed
        info.update(metal_hu=round(metal_hu, 1), radius_mm=round(radius, 2), half_length_mm=round(half_len, 1))
    else:  # fluid
        centre = _sample_centre(candidates, shape, rng)
        thickness = float(radius_mm) * 2.0 if radius_mm is not None else float(rng.uniform(8.0, 16.0))
        half_z = float(rng.uniform(20.0, 45.0))
        half_angle = float(rng.uniform(0.8, 1.4))
        target = float(rng.uniform(5.0, 15.0))
        kz = int(math.ceil(half_z / spacing_zyx[0]))
        box = (slice(max(0, centre[0] - kz), min(shape[0], centre[0] + kz + 1)), slice(None), slice(None))
        slab = image[box]
        cy, cx, ay, ax = _body_ellipse(slab, body_threshold)
        cy, cx, ay, ax = (v.astype(np.float32) for v in (cy, cx, ay, ax))
        yy = np.arange(shape[1], dtype=np.float32).reshape(1, -1, 1)
        xx = np.arange(shape[2], dtype=np.float32).reshape(1, 1, -1)
        ci = centre[0] - box[0].start
        c_rho = math.hypot((centre[1] - cy[ci, 0, 0]) / ay[ci, 0, 0], (centre[2] - cx[ci, 0, 0]) / ax[ci, 0, 0])
        c_theta = math.atan2((centre[1] - cy[ci, 0, 0]) / ay[ci, 0, 0], (centre[2] - cx[ci, 0, 0]) / ax[ci, 0, 0])
        dyn, dxn = (yy - cy) / ay, (xx - cx) / ax
        rho = np.sqrt(dyn**2 + dxn**2)
        theta = np.arctan2(dyn, dxn)
        dtheta = np.abs(np.mod(theta - c_theta + np.pi, 2.0 * np.pi) - np.pi)
        gz = ((np.arange(box[0].start, box[0].stop) - centre[0]) * spacing_zyx[0]).reshape(-1, 1, 1)
        taper = np.sqrt(np.clip(1.0 - (gz / half_z) ** 2, 0.0, None)) * np.sqrt(
            np.clip(np.cos(np.pi / 2.0 * np.minimum(dtheta / half_angle, 1.0)), 0.0, None)
        )
        mm_per_rho = np.sqrt(ay * ax) * math.sqrt(sp[0] * sp[1])
        band = np.abs(rho - c_rho) * mm_per_rho < thickness / 2.0 * taper
        old = slab.astype(np.float32)
        fluid = band & (old > -150.0) & (old < 200.0)
        if region_mask is not None:
            fluid &= region_mask[box]
        fluid[ci, centre[1], centre[2]] = True
        new = old.copy()
        new[fluid] = target + rng.normal(0.0, 6.0, size=int(fluid.sum()))
        write(box, new, fluid)
        mask[box] = fluid
        info.update(target_hu=round(target, 1), thickness_mm=round(thickness, 1), half_length_mm=round(half_z, 1))
    info["centre"] = [int(v) for v in centre]
    info["slices"] = [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]
    return out, mask, info


def insert_anomaly(
    image_hu: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    region_mask: Optional[np.ndarray] = None,
    spacing: Spacing = (1.0, 1.0, 1.0),
    radius_mm: Optional[float] = None,
    return_info: bool = False,
):
    """Insert one anomaly into a CT volume (z, y, x) in HU; return (new_image, mask) [, info].

    The input is not modified; the output has its dtype (integers are rounded and clipped). SPACING is
    (x, y, z) mm. The centre is drawn inside REGION_MASK when given, else inside the body (HU > -500).
    Kinds and their masks (uint8, 1 = anomaly):

    - ``hypodense_lesion``: soft-edged ellipsoid (radius_mm default 6-15, axes +-20%) confined to the
      region, shifted to 10-30 HU (always >= 30 HU below the local median). Mask: the nominal
      ellipsoid within the region; the soft edge just outside changes by less than half the shift.
    - ``hyperdense_lesion``: the same shape, 80-120 HU brighter than its surroundings.
    - ``metal_stent``: a metal cylinder along z (radius_mm default 2-3.5, 30-80 mm long,
      2500-3000 HU) with bright/dark radial streaks across the body in its slices, decaying with
      distance. Mask: the metal plus every voxel whose HU changed by more than MATERIAL_CHANGE_HU
      (so a star around the metal); weaker streak changes lie outside it.
    - ``fluid``: an ascites crescent along the body wall (thickness 2 * radius_mm, default 8-16 mm),
      5-15 HU with noise, replacing fat and soft tissue only (-150..200 HU), tapered at its ends.
      Mask: exactly the replaced voxels.

    With RETURN_INFO, also returns a dict: kind, centre (z, y, x voxel), sizes, slices touched.
    """
    new_image, mask, info = _insert(image_hu, kind, rng, region_mask, spacing, radius_mm)
    return (new_image, mask, info) if return_info else (new_image, mask)


def make_phantom_set(
    folder,
    num_cases: int,
    anomalous: bool,
    seed: int = 0,
    num_slices: int = 64,
    size: int = 128,
    spacing: Spacing = (1.5, 1.5, 3.0),
) -> List[dict]:
    """Write NUM_CASES phantoms into FOLDER; anomalous ones carry 1-3 random anomalies each.

    Returns one dict per case: name, image, anomaly, organs (paths), anomalies (what was inserted).
    Case seeds derive from SEED (normal and anomalous sets with the same seed use different subjects).
    """
    folder = Path(folder)
    prefix = "anomalous" if anomalous else "normal"
    rng = np.random.default_rng([seed, 7, int(anomalous)])
    cases = []
    for index in range(num_cases):
        case_seed = int(rng.integers(0, 2**31 - 1))
        kinds: List[str] = []
        if anomalous:
            count = int(rng.integers(1, 4))
            kinds = [str(k) for k in rng.choice(ANOMALY_KINDS, size=count, replace=True)]
        phantom = make_phantom(num_slices, size, spacing, seed=case_seed, anomalies=kinds)
        name = f"{prefix}_{index:03d}"
        paths = phantom.save(folder, name)
        cases.append({"name": name, "seed": case_seed, **paths, "anomalies": phantom.anomalies})
    return cases


def write_dicom_series(image: sitk.Image, folder, series_uid: str = "1.2.826.0.1.3680043.2.1125.1.99.1") -> Path:
    """Write a CT volume as a DICOM series, one slice per file, with the tags that place each slice in
    space (position, orientation, spacing, rescale) as a scanner writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetSize()[2]):
        plane = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".0",
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, direction[0:7:3] + direction[1:8:3])),
            "0020|0013": str(k + 1),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        with atomic_path(folder / f"slice{k:03d}.dcm", suffix=".dcm") as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(plane)
    return folder
