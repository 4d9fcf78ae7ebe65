#!/usr/bin/env python
"""Segmentation-failure benchmark: do the flags fall where a segmentation model fails?

A reference segmenter (scripts/reference_segmenter.py, a MONAI U-Net trained on the quality benchmark's 24
normal training phantoms' livers) stands in for the clinic's deployed model. It contours the liver of the
test phantoms (16 normal, 24 per anomaly type) and of 24 further subjects with one large liver mass each
(50-90 mm across, hypo- or hyperdense: the clinical-size lesions of the quality benchmark do not break this
segmenter's contours, masses of this size do); the phantoms' true livers are the reference contours (fluid
displaces the liver: the phantom labels it body). A slice has failed where the automatic contour's Dice
is under 0.8 (reference of 50 voxels or more), or where one contour is missing
(AnomalyFlagLib.evaluation.segmentation_failure.FailureRule).

Each detector backend (trained on the same normal phantoms, or reused with --model) is recalibrated on 8
further normal phantoms with the segmenter's own contours (the deployed model's contours on normal scans),
which gives it the organ-aware calibration (liver contour plus 10 mm) beside the whole-body one. Per
backend: failure AUROC/AUPRC, AURC and the Dice recovered by recontouring the flagged slices, for the
organ-aware score (flags at its calibrated threshold) and the whole-body score (flags at its own); beside
baselines at the organ-aware flag count: random flags, the segmenter's own uncertainty (mean softmax entropy
inside and around its contour), and the sum and the maximum of the two ranks (anomaly score and
uncertainty). Also the false-flag rate on the normal test phantoms, and where the failures lie: on slices
where an anomaly touches the true liver or its margin, or elsewhere (failures no anomaly detector can
foresee). Every figure is given for the quality benchmark's test sets, for the liver masses alone, and for
all together. Writes failure.json, failure_<backend>.png and prints a Markdown table; each backend's
per-slice tables are kept in slices_<backend>.npz and used again by a later run with the same output (delete
one to score again).

    python scripts/failure_benchmark.py                          # train what is missing: ~20 + 30 min per backend
    python scripts/failure_benchmark.py --model restoration=reports/quality/models/phantom_restoration
    python scripts/failure_benchmark.py --smoke                  # small data, short budgets (a few minutes)
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))
sys.path.insert(0, str(ROOT / "scripts"))

from AnomalyFlagLib.atomic_files import atomic_path, write_json_atomic  # noqa: E402
from AnomalyFlagLib.bundle import load_bundle  # noqa: E402
from AnomalyFlagLib.detectors import DEFAULT_BACKEND  # noqa: E402
from AnomalyFlagLib.evaluation.segmentation_failure import (  # noqa: E402
    FailureRule,
    failed_slices,
    failure_metrics,
    flag_ranking,
    slice_dice,
    write_failure_png,
)
from AnomalyFlagLib.geometry import Geometry  # noqa: E402
from AnomalyFlagLib.io.cases import discover_cases  # noqa: E402
from AnomalyFlagLib.io.volumes import write_image_atomic  # noqa: E402
from AnomalyFlagLib.orientation import AxialFrame  # noqa: E402
from AnomalyFlagLib.phantom import ANOMALY_KINDS, ORGAN_LABELS, make_phantom  # noqa: E402
from AnomalyFlagLib.roi import RoiSlabs  # noqa: E402
from AnomalyFlagLib.scoring import Scorer  # noqa: E402
from AnomalyFlagLib.training import recalibrate  # noqa: E402
from quality_benchmark import KIND_LABELS, make_phantom_sets, train_backend  # noqa: E402

SEGMENTER = ROOT / "scripts" / "reference_segmenter.py"
MASS = "liver mass"  # the extra test set of large liver masses, reported apart and pooled with the others
MARGIN_MM = 10.0  # the organ-aware score's margin around the contour (the scorer's default)


def liver_mass(rng: np.random.Generator) -> dict:
    """A hypo- or hyperdense liver mass 50-90 mm across: the size at which masses break liver contours."""
    kind = ("hypodense_lesion", "hyperdense_lesion")[int(rng.integers(2))]
    return {"kind": kind, "radius_mm": float(rng.uniform(25.0, 45.0)), "region": "liver"}


def make_extra_set(folder: Path, like: Path, count: int, seed: int, prefix: str, anomaly=None) -> Path:
    """`count` further phantoms with the test phantoms' geometry, each with the anomaly `anomaly(rng)` gives
    (none when None); seeded, written once."""
    done = folder / "complete.json"
    if done.is_file():
        return folder
    spec = json.loads((like / "complete.json").read_text())
    rng = np.random.default_rng(seed)
    for i in range(count):
        anomalies = [anomaly(rng)] if anomaly is not None else []
        phantom = make_phantom(spec["slices"], spec["size"], tuple(spec["spacing"]), seed=int(rng.integers(2**31)),
                               anomalies=anomalies)  # fmt: skip
        phantom.save(folder, f"{prefix}_{i:03d}")
    write_json_atomic(done, {"count": count, **spec}, indent=None)
    return folder


def _segmenter(*args: str) -> None:
    subprocess.run([sys.executable, str(SEGMENTER), *args], check=True)


def contoured_copy(source: Path, dest: Path, model: Path) -> Path:
    """`dest` holds the cases of `source` (image and anomaly mask linked), their true liver as
    `<case>_reference.nrrd` and the segmenter's contour and uncertainty (`<case>_seg.nrrd`, `_uncertainty.csv`)."""
    if (dest / "complete.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for case in discover_cases(source):
        for path in (case.image, case.mask):
            if path is not None and not (dest / path.name).exists():
                os.link(path, dest / path.name)
        organs = sitk.ReadImage(str(source / f"{case.name}_organs.nrrd"))
        liver = sitk.Cast(organs == ORGAN_LABELS["liver"], sitk.sitkUInt8)
        write_image_atomic(liver, dest / f"{case.name}_reference.nrrd")
    _segmenter("predict", "--model", str(model), "--input", str(source), "--output", str(dest))
    write_json_atomic(dest / "complete.json", {"source": str(source)}, indent=None)
    return dest


def _uncertainty(path: Path, n: int) -> np.ndarray:
    values = np.zeros(n)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            v = float(row["mean_entropy"]) if row["mean_entropy"] not in ("", "nan", "NaN") else float("nan")
            values[int(row["index"])] = v if np.isfinite(v) else 0.0
    return values


def anomaly_at_organ(case, geometry: Geometry) -> np.ndarray:
    """Per slice: does the case's anomaly touch the true organ or its MARGIN_MM margin there?"""
    frame = AxialFrame.from_geometry(geometry)
    n = geometry.size[frame.slice_ijk_axis]
    if case.mask is None:
        return np.zeros(n, dtype=bool)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.reference))) > 0
    if not reference.any():
        return np.zeros(n, dtype=bool)
    near = RoiSlabs(reference, geometry, MARGIN_MM).slab(0, n).numpy() > 0.5
    anomaly = frame.view(sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0)
    return (near & anomaly).any(axis=(1, 2))


def case_table(scorer: Scorer, case, rule: FailureRule) -> dict:
    """Per slice of one case: Dice, failure, the organ-aware and whole-body scores and flags, uncertainty, and
    whether an anomaly lies at the organ."""
    image = sitk.ReadImage(str(case.image))
    geometry = Geometry.from_image(image)
    body = scorer.score(image, name=case.name)
    organ = scorer.score(image, name=case.name, roi=str(case.segmentation))
    dice = slice_dice(str(case.segmentation), str(case.reference), geometry)
    return {
        "name": case.name,
        "dice": dice["dice"],
        "failed": failed_slices(dice, rule),
        "anomaly_at_organ": anomaly_at_organ(case, geometry),
        "organ_score": flag_ranking(organ.slices),
        "organ_flagged": organ.slices["flagged"],
        "in_roi": organ.slices["in_roi"],
        "body_score": flag_ranking(body.slices),
        "body_flagged": body.slices["flagged"],
        "uncertainty": _uncertainty(case.image.parent / f"{case.name}_uncertainty.csv", len(body.slices)),
        "organ_aware": bool((organ.slices["score_kind"] == "organ").any()),
    }


def save_tables(path: Path, model: Path, tables: dict, seconds: float) -> None:
    """The per-slice tables of every set and the seconds scoring them took, as arrays in an .npz
    (re-analysed without scoring again)."""
    arrays = {"model": np.array(str(model)), "seconds": np.array(float(seconds))}
    for name, group in tables.items():
        for i, table in enumerate(group):
            arrays.update({f"{name}/{i:04d}/{key}": np.asarray(value) for key, value in table.items()})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_tables(path: Path, model: Path):
    """(tables, seconds) as `save_tables` wrote them for `model`, or (None, None): no file, or another model's."""
    if not path.is_file():
        return None, None
    with np.load(path, allow_pickle=False) as data:
        if str(data["model"]) != str(model):
            return None, None
        tables: dict = {}
        for key in (k for k in data.files if k not in ("model", "seconds")):  # in the order written
            name, i, field = key.split("/")
            group = tables.setdefault(name, [])
            if int(i) == len(group):
                group.append({})
            value = data[key]
            group[int(i)][field] = value.item() if value.ndim == 0 else value
        return tables, float(data["seconds"]) if "seconds" in data.files else None


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    flagged = np.zeros(len(scores), dtype=bool)
    if count:
        flagged[np.argsort(-scores, kind="stable")[:count]] = True
    return flagged


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / max(1, len(values) - 1)


def compare(tables: list, seed: int = 0) -> dict:
    """Failure metrics of every method over the pooled slices of `tables`."""
    pooled = {key: np.concatenate([t[key] for t in tables]) for key in tables[0] if key not in ("name", "organ_aware")}
    dice, failed = pooled["dice"], pooled["failed"]
    count = int(pooled["organ_flagged"].sum())
    rng = np.random.default_rng(seed)
    random_runs = [failure_metrics(s, failed, dice, _top(s, count)) for s in rng.random((20, len(dice)))]
    organ_rank, uncertainty_rank = _ranks(pooled["organ_score"]), _ranks(pooled["uncertainty"])
    summed = organ_rank + uncertainty_rank
    either = np.maximum(organ_rank, uncertainty_rank)  # extreme on either: the two see different failures
    methods = {
        "organ-aware": failure_metrics(pooled["organ_score"], failed, dice, pooled["organ_flagged"]),
        "whole-body": failure_metrics(pooled["body_score"], failed, dice, pooled["body_flagged"]),
        "uncertainty": failure_metrics(pooled["uncertainty"], failed, dice, _top(pooled["uncertainty"], count)),
        "organ-aware + uncertainty": failure_metrics(summed, failed, dice, _top(summed, count)),
        "max(organ-aware, uncertainty)": failure_metrics(either, failed, dice, _top(either, count)),
    }
    keys = ("failure_auroc", "failure_auprc", "aurc", "mean_dice_after", "dice_recovered_share",
            "flagged_per_failure_found", "failures_flagged")  # fmt: skip
    methods["random flags"] = {
        k: (
            float(np.mean([r[k] for r in random_runs if r[k] is not None]))
            if any(r[k] is not None for r in random_runs)
            else None
        )
        for k in keys  # fmt: skip
    }
    same = ("n_slices", "n_failures", "n_flagged", "mean_dice_before", "aurc_random", "aurc_optimal")
    methods["random flags"].update({k: random_runs[0][k] for k in same})
    return methods


def failure_causes(tables: list) -> dict:
    """How many failed slices have an anomaly at the organ (within the margin), and how many do not."""
    failed = np.concatenate([t["failed"] for t in tables])
    at_organ = np.concatenate([t["anomaly_at_organ"] for t in tables])
    return {"failed": int(failed.sum()), "failed_with_anomaly_at_organ": int((failed & at_organ).sum()),
            "slices_with_anomaly_at_organ": int(at_organ.sum()),
            "failed_share_of_anomaly_at_organ": float(failed[at_organ].mean()) if at_organ.any() else None,
            "failed_share_elsewhere": float(failed[~at_organ].mean())}  # fmt: skip


def false_flag_rates(tables: list) -> dict:
    """Share flagged of the normal test phantoms' slices: organ-aware among the slices of the contour and
    its margin, whole-body among all."""
    in_roi = np.concatenate([t["in_roi"] for t in tables])
    organ = np.concatenate([t["organ_flagged"] for t in tables])
    body = np.concatenate([t["body_flagged"] for t in tables])
    return {"organ_aware": float(organ[in_roi].mean()) if in_roi.any() else None, "organ_slices": int(in_roi.sum()),
            "whole_body": float(body.mean()), "slices": int(len(body))}  # fmt: skip


def markdown(results: dict) -> str:
    """One row per backend and method: the failure AUROC on the quality benchmark's sets, the liver masses
    and all; the rest over all sets (failure.json has every figure for each)."""

    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| backend | method | failure AUROC: quality sets / liver masses / all | AURC, all | Dice before -> "
             "after, all | Dice recovered: liver masses / all | flagged per failure found, all "
             "| false-flag rate, normal |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend, res in results["backends"].items():
        normal = res["false_flag_rate_normal"]
        quality, masses, every = res["methods_without_masses"], res["per_set"][MASS], res["methods"]
        for method, m in every.items():
            ffr = {"organ-aware": normal["organ_aware"], "whole-body": normal["whole_body"]}.get(method)
            auroc = " / ".join(f(x[method]["failure_auroc"]) for x in (quality, masses, every))
            dice = f"{f(m['mean_dice_before'])} -> {f(m['mean_dice_after'])}"
            lines.append(
                f"| {backend} | {method} | {auroc} | {f(m['aurc'])} | {dice} "
                f"| {f(masses[method]['dice_recovered_share'], 2)} / {f(m['dice_recovered_share'], 2)} "
                f"| {f(m['flagged_per_failure_found'], 1)} | {f(ffr)} |"
            )
    first = next(iter(results["backends"].values()), None)
    if first is not None:
        groups = {"quality sets": first["methods_without_masses"], "liver masses": first["per_set"][MASS],
                  "all": first["methods"]}  # fmt: skip
        counts = {name: (m["random flags"]["n_failures"], m["random flags"]["n_slices"]) for name, m in groups.items()}
        lines.append("\nFailed slices: " + ", ".join(f"{k} {a} of {b}" for k, (a, b) in counts.items())
                     + f"; AURC of a random ranking {f(first['methods']['random flags']['aurc_random'])}, optimal "
                     f"{f(first['methods']['random flags']['aurc_optimal'])} (all).")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=DEFAULT_BACKEND, help="comma-separated detector backends")
    parser.add_argument("--model", action="append", default=[], metavar="BACKEND=PATH",
                        help="use this trained bundle for BACKEND instead of training one")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget of a backend trained here")
    parser.add_argument("--segmenter-minutes", type=float, default=20.0, help="the reference segmenter's budget")
    parser.add_argument("--smoke", action="store_true", help="small data and short budgets (a quick check)")
    parser.add_argument("--data", default=str(ROOT / "data" / "quality"))
    parser.add_argument("--output", default=str(ROOT / "reports" / "failure"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.monotonic()
    minutes = 1.0 if args.smoke and args.minutes == 30.0 else args.minutes
    seg_minutes = 1.0 if args.smoke and args.segmenter_minutes == 20.0 else args.segmenter_minutes
    data, out = Path(args.data) / ("smoke" if args.smoke else "full"), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    given = dict(item.split("=", 1) for item in args.model)
    sets = make_phantom_sets(data / "phantoms", args.smoke)
    calibration = make_extra_set(data / "failure_calibration", data / "phantoms", 3 if args.smoke else 8, 4000, "calib")
    masses = make_extra_set(
        data / "failure_masses", data / "phantoms", 2 if args.smoke else 24, 5000, "mass", liver_mass
    )

    segmenter = out / "segmenter"
    if not (segmenter / "model.json").is_file():
        _segmenter("train", "--input", str(sets["train"]), "--output", str(segmenter), "--minutes", str(seg_minutes))
    cases = out / "cases"
    test_sets = {"normal": sets["test_normal"], **{KIND_LABELS[k]: sets[k] for k in ANOMALY_KINDS}, MASS: masses}
    calib = contoured_copy(calibration, cases / "calibration", segmenter)
    contoured = {name: contoured_copy(folder, cases / name, segmenter) for name, folder in test_sets.items()}

    rule = FailureRule()
    results = {"rule": rule.to_dict(), "segmenter": json.loads((segmenter / "model.json").read_text()),
               "backends": {}}  # fmt: skip
    for backend in args.backends.split(","):
        trained = Path(given[backend]) if backend in given else out / "models" / f"phantom_{backend}"
        record = {"model": str(trained)}
        if backend not in given and not (trained / "metadata.json").is_file():
            record["training"] = train_backend(
                backend, sets["train"], trained, minutes, replay={}, device=args.device, settings={}
            )
        organ_model, saved = out / "models" / f"{backend}_organ", out / f"slices_{backend}.npz"
        tables, seconds = load_tables(saved, organ_model)  # delete the file to score again
        if tables is None:
            scoring_started = time.monotonic()
            recalibrate(trained, calib, organ_model, device=args.device)
            scorer = Scorer(organ_model, device=args.device)
            tables = {name: [case_table(scorer, c, rule) for c in discover_cases(folder)]
                      for name, folder in contoured.items()}  # fmt: skip
            seconds = time.monotonic() - scoring_started
            save_tables(saved, organ_model, tables, seconds)
        record["calibration_and_scoring_seconds"] = None if seconds is None else round(seconds)
        every = [t for group in tables.values() for t in group]
        record["organ_calibration"] = load_bundle(organ_model).organ_calibration.to_dict()
        record["methods"] = compare(every)
        record["methods_without_masses"] = compare([t for n, g in tables.items() if n != MASS for t in g])
        record["per_set"] = {name: compare(group) for name, group in tables.items()}
        record["false_flag_rate_normal"] = false_flag_rates(tables["normal"])
        record["failure_causes"] = {"all": failure_causes(every), **{n: failure_causes(g) for n, g in tables.items()}}
        record["segmenter_mean_dice"] = {name: float(np.mean(np.concatenate([t["dice"] for t in group])))
                                         for name, group in tables.items()}  # fmt: skip
        results["backends"][backend] = record
        shown = sorted(
            (t for t in every if t["failed"].any()), key=lambda t: -int((t["failed"] & t["organ_flagged"]).sum())
        )
        per_case = [{"name": t["name"], "dice": t["dice"], "failed": t["failed"], "flagged": t["organ_flagged"]}
                    for t in shown]  # fmt: skip
        write_failure_png(out / f"failure_{backend}.png", per_case, record["methods"]["organ-aware"],
                          title=f"{backend}: organ-aware flags against the reference segmenter's failures")  # fmt: skip
        for group in (record["methods"], record["methods_without_masses"], *record["per_set"].values()):
            for metrics in group.values():  # the PNG draws the curve; a point per slice is too much for the JSON
                metrics.pop("risk_coverage", None)
        write_json_atomic(out / "failure.json", {**results, "seconds_this_run": round(time.monotonic() - started)},
                          indent=1)  # fmt: skip
        print(markdown({"backends": {backend: record}}), flush=True)
    print(markdown(results))
    print(f"Report: {out / 'failure.json'} and failure_<backend>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
