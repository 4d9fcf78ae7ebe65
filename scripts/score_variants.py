#!/usr/bin/env python
"""Compare slice-score settings of one trained model without retraining it: the model's raw maps of the
quality benchmark's phantoms are computed once (cached), then each setting is calibrated on the model's
own held-out normal subjects exactly as `train` calibrates (`training.calibrate_from_maps`) and scored
on the unseen test subjects as `score` would (the bundle's `MapScorer`, the neighbour rule, the
calibration). Prints slice AUROC per anomaly type, sensitivity at the calibrated threshold and the
false-flag rate on the normal test subjects, per setting. An experiment tool (docs/detector-experiments.md):
nothing here looks at the test sets to choose anything.

    python scripts/score_variants.py --model reports/quality/models/phantom_restoration \\
        --set score_area_mm2=25,50,100 --set neighbour_slices=1,2 --tuning

With --add-components OTHER_MODEL (same preprocessing and held-out subjects) the other model's maps join
as further components, weighted by `--set weight.NAME=...`: what a second detector would add.

With --tuning the unseen subjects are the tuning set (`quality_benchmark.TUNING_COUNTS`, written once
into data/quality/full/tuning): choose settings there, then confirm the choice once on the test sets.
"""

import argparse
import copy
import dataclasses
import itertools
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))
sys.path.insert(0, str(ROOT / "scripts"))

from AnomalyFlagLib.bundle import load_bundle  # noqa: E402
from AnomalyFlagLib.calibration import calibrate, scan_levels  # noqa: E402
from AnomalyFlagLib.io.cases import discover_cases  # noqa: E402
from AnomalyFlagLib.maps import neighbour_max  # noqa: E402
from AnomalyFlagLib.phantom import ANOMALY_KINDS  # noqa: E402
from AnomalyFlagLib.training import calibrate_from_maps, raw_maps  # noqa: E402
from AnomalyFlagLib.training_slices import load_slices  # noqa: E402
from quality_benchmark import KIND_LABELS, _auc, make_phantom_sets  # noqa: E402

PHANTOMS = ROOT / "data" / "quality" / "full" / "phantoms"


def _set_cases(folder: Path, names=None):
    cases = [c for c in discover_cases(folder) if names is None or c.name in names]
    return [c for c in cases if not c.image.name.endswith("_organs.nrrd")]


def extra_held_out(model: Path, folder: Path, cache: dict, count: int) -> dict:
    """`cache` with the first `count` normal subjects of `folder` (other seeds than the benchmark's sets)
    added to the held-out subjects: what calibrating on more subjects would give."""
    key = f"extra_{folder.name}"
    if key not in cache:
        bundle = load_bundle(model)
        cases = _set_cases(folder)
        slices = load_slices(cases, bundle.preprocess, masked="ignore")
        slices.regions = None
        raw, body = raw_maps(bundle, slices, torch.device("cpu"))
        cache[key] = {"slices": slices, "raw": raw, "body": body, "cases": len(cases)}
    extra, held = cache[key], cache["held_out"]
    keep = extra["slices"].case_index < count
    more = extra["slices"].select(keep)
    more.case_index = more.case_index + held["cases"]
    slices = copy.copy(held["slices"])
    for name in ("images", "positions", "case_index", "slice_index"):
        setattr(slices, name, torch.cat([getattr(held["slices"], name), getattr(more, name)]))
    raw = {n: torch.cat([held["raw"][n], extra["raw"][n][keep]]) for n in held["raw"]}
    merged = {"slices": slices, "raw": raw, "body": torch.cat([held["body"], extra["body"][keep]]),
              "cases": held["cases"] + count}  # fmt: skip
    return {**cache, "held_out": merged}


def add_components(base, cache: dict, other: Path, other_cache: dict):
    """The bundle and cache with another model's component maps added as further components of weight 0
    (set one with `--set weight.NAME=...`): what a second detector's maps would add to the anomaly map.
    Both models must share the preprocessing and the held-out subjects."""
    second = load_bundle(other)
    for key in ("preprocessing", "orientation"):
        if second.metadata.get(key) != base.metadata.get(key):
            raise SystemExit(f"--add-components: {other} was made with other {key} than the model")
    if second.metadata["training"]["calibration_cases"] != base.metadata["training"]["calibration_cases"]:
        raise SystemExit(f"--add-components: {other} held out other subjects than the model (train a seed alike)")
    clash = {c.name for c in second.components} & {c.name for c in base.components}
    if clash:
        raise SystemExit(f"--add-components: both models have the component(s) {', '.join(sorted(clash))}")
    merged = {}
    for key, part in cache.items():
        if not torch.equal(part["body"], other_cache[key]["body"]):
            raise SystemExit(f"--add-components: the two caches differ in the slices of '{key}'")
        merged[key] = {**part, "raw": {**part["raw"], **other_cache[key]["raw"]}}
    bundle = copy.copy(base)
    bundle.backend = copy.copy(base.backend)
    bundle.backend.components = tuple(base.components) + tuple(
        dataclasses.replace(c, weight=0.0) for c in second.components
    )
    return bundle, merged


def build_cache(model: Path, data: Path, train: Path, cache: Path) -> dict:
    """Raw maps, body masks, positions, case and slice indices and slice labels of the held-out normal
    subjects (the model's own, in `train`), the normal test subjects and each anomaly type's test subjects
    (in `data`)."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    bundle = load_bundle(model)
    held_out = bundle.metadata["training"]["calibration_cases"]
    sets = {"held_out": _set_cases(train, set(held_out)), "test_normal": _set_cases(data / "test_normal")}
    sets.update({kind: _set_cases(data / f"test_{kind}") for kind in ANOMALY_KINDS})
    out = {}
    for name, cases in sets.items():
        slices = load_slices(cases, bundle.preprocess, masked="ignore")
        slices.regions = None
        raw, body = raw_maps(bundle, slices, torch.device("cpu"))
        label = torch.zeros(len(slices), dtype=torch.bool)
        for ci, case in enumerate(cases):
            if case.mask is not None:
                marked = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))).any(axis=(1, 2))
                mine = slices.case_index == ci
                label[mine] = torch.from_numpy(marked[slices.slice_index[mine].numpy()])
        out[name] = {"slices": slices, "raw": raw, "body": body, "label": label, "cases": len(cases)}
        print(f"{name}: {len(slices)} slices of {len(cases)} cases", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


@torch.no_grad()
def slice_scores(bundle, part: dict) -> np.ndarray:
    """Normalised slice scores of a cached set, as `score` computes them."""
    scorer = bundle.map_scorer()
    slices, raw, body = part["slices"], part["raw"], part["body"]
    scores = np.zeros(len(slices))
    for k0 in range(0, len(slices), 128):
        k1 = min(len(slices), k0 + 128)
        maps = {n: v[k0:k1].float() for n, v in raw.items()}
        scores[k0:k1] = scorer(maps, slices.positions[k0:k1], body[k0:k1]).score.float().numpy()
    context, _ = neighbour_max(scores, slices.case_index.numpy(), slices.slice_index.numpy(),
                               bundle.scoring.neighbour_slices)  # fmt: skip
    normalised = bundle.calibration.normalise(context, slices.positions.numpy())
    if bundle.scoring.relative_to_scan:
        normalised = normalised - scan_levels(normalised, slices.case_index.numpy())
    return normalised


def calibrated(base, cache: dict, scoring: dict, weights: dict):
    """A copy of the bundle with `scoring` and component `weights` changed, calibrated on the held-out
    subjects, and the held-out slices' cross-fitted normalised scores that calibration saw (relative to
    their scan where the scoring says so)."""
    import AnomalyFlagLib.training as training

    seen = []

    def capture(scores, positions, *args, **kwargs):
        seen.append((np.asarray(scores, dtype=float), np.asarray(positions, dtype=float), kwargs.get("case_index")))
        return calibrate(scores, positions, *args, **kwargs)

    bundle = copy.copy(base)
    bundle.scoring = copy.copy(base.scoring)
    for key, value in scoring.items():
        setattr(bundle.scoring, key, value)
    if weights:  # on a copy of the backend (it shares the networks): the components are the backend's
        bundle.backend = copy.copy(base.backend)
        bundle.backend.components = tuple(
            type(c)(c.name, c.description, weights.get(c.name, c.weight), c.whole_slice) for c in base.components
        )
    held = cache["held_out"]
    training.calibrate = capture
    try:
        calibrate_from_maps(bundle, held["slices"], held["raw"], held["body"], held["cases"], torch.device("cpu"),
                            log=lambda s: None)  # fmt: skip
    finally:
        training.calibrate = calibrate
    scores, positions, cases = seen[0]
    own = bundle.calibration.normalise(scores, positions)
    return bundle, own if cases is None else own - scan_levels(own, cases)


def test_scores(bundle, cache: dict) -> dict:
    """Normalised scores of the normal test slices and of each type's anomalous slices."""
    out = {"test_normal": slice_scores(bundle, cache["test_normal"])}
    for kind in ANOMALY_KINDS:
        out[kind] = slice_scores(bundle, cache[kind])[cache[kind]["label"].numpy()]
    return out


def figures(scores: dict, threshold: float) -> dict:
    normal = scores["test_normal"]
    row = {"false_flag_rate": float(np.mean(normal > threshold))}
    for kind in ANOMALY_KINDS:
        row[KIND_LABELS[kind]] = (_auc(scores[kind], normal), float(np.mean(scores[kind] > threshold)))
    return row


def evaluate(base, cache: dict, scoring: dict, weights: dict) -> dict:
    bundle, _ = calibrated(base, cache, scoring, weights)
    return figures(test_scores(bundle, cache), bundle.calibration.threshold)


def combined(base, cache: dict, settings: list, rate: float) -> dict:
    """The slice score as the largest of several settings' normalised scores, thresholded at the quantile
    of the held-out slices' (cross-fitted) largest normalised score that flags `rate` of them."""
    held, tests = [], []
    for scoring, weights in settings:
        bundle, own = calibrated(base, cache, scoring, weights)
        held.append(own)
        tests.append(test_scores(bundle, cache))
    threshold = float(np.quantile(np.max(held, axis=0), 1 - rate, method="higher"))
    return figures({k: np.max([t[k] for t in tests], axis=0) for k in tests[0]}, threshold)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    unseen = parser.add_mutually_exclusive_group()
    unseen.add_argument("--data", default=str(PHANTOMS), help="the unseen subjects' sets (default: the test sets)")
    unseen.add_argument("--tuning", action="store_true", help="the tuning set's subjects instead (made once)")
    parser.add_argument("--train", default=str(PHANTOMS / "train"), help="the model's training subjects")
    parser.add_argument("--cache", help="where to keep the raw maps (default: beside the model)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a ScoreConfig field, or weight.COMPONENT, and the values to try")  # fmt: skip
    parser.add_argument("--combine", action="store_true",
                        help="also: the largest of the settings' normalised scores as one slice score")  # fmt: skip
    parser.add_argument("--add-components", metavar="MODEL",
                        help="another model's component maps as further components (weight 0 unless set)")  # fmt: skip
    parser.add_argument("--more-held-out", type=int, default=0, metavar="N",
                        help="calibrate on N more normal subjects of --extra-normals as well")  # fmt: skip
    parser.add_argument("--extra-normals", default=str(ROOT / "data" / "quality" / "extra_normals"))
    args = parser.parse_args(argv)
    if args.more_held_out and args.add_components:
        parser.error("--more-held-out and --add-components do not combine")
    torch.set_grad_enabled(False)
    model = Path(args.model)
    data = Path(args.data)
    if args.tuning:
        data = ROOT / "data" / "quality" / "full" / "tuning"
        make_phantom_sets(data, smoke=False, tuning=True)
    suffix = "_tuning_maps.pt" if args.tuning else "_maps.pt"
    cache = build_cache(model, data, Path(args.train), Path(args.cache or model.with_name(model.name + suffix)))
    if args.more_held_out:
        cache = extra_held_out(model, Path(args.extra_normals), cache, args.more_held_out)
    base = load_bundle(model)
    if args.add_components:
        other = Path(args.add_components)
        other_cache = build_cache(other, data, Path(args.train), other.with_name(other.name + suffix))
        base, cache = add_components(base, cache, other, other_cache)
    grid = []
    for item in args.set:
        key, values = item.split("=", 1)
        grid.append([(key, float(v) if "." in v or "e" in v else int(v)) for v in values.split(",")])
    print("| setting | hypodense | hyperdense | stent | fluid | false flags |")
    print("| --- | --- | --- | --- | --- | --- |")

    def show(name, row):
        cells = " | ".join(f"{row[KIND_LABELS[k]][0]:.3f} ({row[KIND_LABELS[k]][1]:.2f})" for k in ANOMALY_KINDS)
        print(f"| {name} | {cells} | {row['false_flag_rate']:.1%} |", flush=True)

    settings = []
    for combo in itertools.product(*grid) if grid else [()]:
        scoring = {k: v for k, v in combo if not k.startswith("weight.")}
        weights = {k.split(".", 1)[1]: float(v) for k, v in combo if k.startswith("weight.")}
        settings.append((scoring, weights))
        show(", ".join(f"{k}={v}" for k, v in combo) or "as trained", evaluate(base, cache, scoring, weights))
    if args.combine:
        show("largest of the above", combined(base, cache, settings, base.scoring.target_false_flag_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
