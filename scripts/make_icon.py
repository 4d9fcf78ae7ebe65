"""Draw the AnomalyFlag icon (128x128 RGBA PNG): an axial CT slice with a red hot spot and a flag.

Usage: python scripts/make_icon.py  (writes AnomalyFlag.png and AnomalyFlag/Resources/Icons/AnomalyFlag.png)

Drawn procedurally with numpy at 4x resolution and averaged down (anti-aliasing); saved with matplotlib.
"""

from pathlib import Path

import numpy as np

SIZE = 128
OVERSAMPLE = 4
ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = (ROOT / "AnomalyFlag.png", ROOT / "AnomalyFlag" / "Resources" / "Icons" / "AnomalyFlag.png")


def _coverage(inside: np.ndarray) -> np.ndarray:
    return inside.astype(np.float64)


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / ax
    v = (-(x - cx) * s + (y - cy) * c) / ay
    return u * u + v * v <= 1.0


def _over(canvas: np.ndarray, rgb, alpha: np.ndarray) -> None:
    """Composite a flat colour with per-pixel alpha over an RGBA canvas (in place)."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    colour = np.asarray(rgb, dtype=np.float64)
    out_a = a + canvas[..., 3:4] * (1.0 - a)
    safe = np.where(out_a > 0, out_a, 1.0)
    canvas[..., :3] = (colour * a + canvas[..., :3] * canvas[..., 3:4] * (1.0 - a)) / safe
    canvas[..., 3:4] = out_a


def draw(size: int = SIZE, oversample: int = OVERSAMPLE) -> np.ndarray:
    n = size * oversample
    # Coordinates in icon units (0..128), y down.
    y, x = (np.mgrid[0:n, 0:n] + 0.5) * (size / n)
    canvas = np.zeros((n, n, 4))

    # Rounded dark tile.
    r, lo, hi = 22.0, 4.0, size - 4.0
    qx = np.clip(x, lo + r, hi - r)
    qy = np.clip(y, lo + r, hi - r)
    tile = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi) & ((x - qx) ** 2 + (y - qy) ** 2 <= r * r)
    _over(canvas, (0.11, 0.13, 0.17), _coverage(tile))

    # Axial CT slice: body outline (fat ring), soft tissue, organs, spine.
    cx, cy = 58.0, 70.0
    _over(canvas, (0.42, 0.42, 0.42), _coverage(_ellipse(x, y, cx, cy, 44, 34)))
    _over(canvas, (0.62, 0.62, 0.62), _coverage(_ellipse(x, y, cx, cy, 40, 30)))
    _over(canvas, (0.74, 0.74, 0.74), _coverage(_ellipse(x, y, cx - 15, cy - 4, 17, 13, 0.3)))  # liver
    _over(canvas, (0.70, 0.70, 0.70), _coverage(_ellipse(x, y, cx + 20, cy - 2, 9, 7, -0.4)))  # spleen
    _over(canvas, (0.80, 0.80, 0.80), _coverage(_ellipse(x, y, cx - 10, cy + 15, 6, 4.5)))  # kidney
    _over(canvas, (0.80, 0.80, 0.80), _coverage(_ellipse(x, y, cx + 10, cy + 15, 6, 4.5)))  # kidney
    _over(canvas, (0.97, 0.97, 0.97), _coverage(_ellipse(x, y, cx, cy + 21, 6.5, 5.5)))  # vertebra
    _over(canvas, (0.88, 0.88, 0.88), _coverage(_ellipse(x, y, cx, cy + 9, 3.2, 3.2)))  # aorta

    # Anomaly heatmap: a hot spot inside the liver, yellow rim to red core.
    hx, hy = cx - 17.0, cy - 6.0
    d2 = (x - hx) ** 2 + (y - hy) ** 2
    glow = np.exp(-d2 / (2 * 8.0**2))
    _over(canvas, (1.0, 0.85, 0.10), 0.85 * glow * (glow > 0.08))
    _over(canvas, (0.95, 0.10, 0.05), np.clip((glow - 0.35) / 0.4, 0.0, 1.0))

    # Flag: pole and a red pennant, top right.
    px = 98.0
    pole = (np.abs(x - px) <= 2.0) & (y >= 14.0) & (y <= 60.0)
    _over(canvas, (0.95, 0.95, 0.95), _coverage(pole))
    _over(canvas, (0.95, 0.95, 0.95), _coverage((x - px) ** 2 + (y - 14.0) ** 2 <= 3.2**2))
    top, bottom, tip = 17.0, 41.0, 122.0
    t = (y - top) / (bottom - top)
    pennant = (x >= px + 1.5) & (t >= 0) & (t <= 1) & (x <= px + 1.5 + (tip - px - 1.5) * (1.0 - np.abs(2 * t - 1)))
    _over(canvas, (0.90, 0.12, 0.10), _coverage(pennant))

    # Average down to the icon size.
    canvas = canvas.reshape(size, oversample, size, oversample, 4)
    alpha = canvas[..., 3].mean(axis=(1, 3))
    premultiplied = (canvas[..., :3] * canvas[..., 3:4]).mean(axis=(1, 3))
    rgb = premultiplied / np.where(alpha > 0, alpha, 1.0)[..., None]
    return np.dstack([rgb, alpha])


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    image = np.clip(draw(), 0.0, 1.0)
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        matplotlib.image.imsave(path, image)
        print(f"wrote {path.relative_to(ROOT)} ({image.shape[1]}x{image.shape[0]})")


if __name__ == "__main__":
    main()
