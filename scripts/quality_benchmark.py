#!/usr/bin/env python
"""Detection-quality benchmark: every backend, the same training budget, phantoms and real CT.

Phantoms (made with AnomalyFlagLib.phantom, seeded): 24 normal training subjects; test sets of unseen
subjects, 16 normal and 24 per anomaly type with one anomaly each, as hard as the clinic's: liver lesions
8-30 mm across at 30-50 HU (hypodense) or 80-120 HU (hyperdense) contrast, metal stents 3-6 mm across,
fluid crescents 3-20 mm thick; 1.5 mm pixels, 5 mm slices, 10-20 HU noise. Real CT: trained on the
normal slices of pyradiomics' lung1 only (its tumour slices left out), tested on lung2 (its real
tumour, and copies of lung2 with one inserted anomaly each). Backends that train on more than normal
scans get the sets of `make_extra_sets` (unlabelled subjects for `--unlabelled`, labelled abnormal
subjects of another seed and mix for `--patients`) and no real-CT row (the only other real scan is the
test patient).

Every backend is trained by `AnomalyFlagLib.training.train` with `max_minutes` = the budget (30 by
default), then scored like any scan. Per anomaly type: slice AUROC and AUPRC (that type's anomalous
slices against every slice of the normal test subjects), pixel AUROC (inside the body of that type's
subjects), sensitivity at the calibrated threshold, and the false-flag rate on the normal test subjects.
Real CT: AUROC of lung2's tumour slices against its other slices, and the share of inserted-anomaly
slices that score above the same slice of the unmodified lung2. Writes quality.json, quality.png (ROC
per type, one row per backend) and prints a Markdown table.

    python scripts/quality_benchmark.py                     # 30 minutes per backend and data set
    python scripts/quality_benchmark.py --minutes 120       # the 4x run
    python scripts/quality_benchmark.py --smoke             # a few minutes in all: small data, 1 minute each
    python scripts/quality_benchmark.py --replay reports/quality/quality.json   # the same steps again
    python scripts/quality_benchmark.py --resume            # a run cut off: keep its models, resume
    python scripts/quality_benchmark.py --resume --recalibrate   # kept models, calibrated again, scored again
    python scripts/quality_benchmark.py --backends fanogan --no-real-ct         # one backend, phantoms only
    python scripts/quality_benchmark.py --backends progressive-ganomaly --set progressive-ganomaly.patch_stride=8
    python scripts/quality_benchmark.py --backends restoration --seed 1   # run-to-run spread: another seed

Data and seeds are fixed (`--seed` changes only the training's: initialisation, batches and which
training subjects are held out to calibrate); with a time budget the number of training steps depends on
the machine's speed, so quality.json records the steps each run made and `--replay` retrains with exactly
those steps (bit-identical on the same machine and library versions).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))
sys.path.insert(0, str(ROOT / "scripts"))

from AnomalyFlagLib.atomic_files import atomic_path, write_json_atomic  # noqa: E402
from AnomalyFlagLib.config import config_from_dict  # noqa: E402
from AnomalyFlagLib.detectors import BACKENDS, DEFAULT_BACKEND, backend_class  # noqa: E402
from AnomalyFlagLib.evaluation.metrics import PixelAccumulator, roc_curve, slice_metrics  # noqa: E402
from AnomalyFlagLib.io.volumes import write_image_atomic  # noqa: E402
from AnomalyFlagLib.phantom import ANOMALY_KINDS, insert_anomaly, make_phantom  # noqa: E402
from AnomalyFlagLib.preprocessing import body_mask  # noqa: E402
from AnomalyFlagLib.scoring import HEATMAP_SCALE, Scorer  # noqa: E402

KIND_LABELS = {
    "hypodense_lesion": "hypodense",
    "hyperdense_lesion": "hyperdense",
    "metal_stent": "stent",
    "fluid": "fluid",
}
AREA_BINS_MM2 = ((0, 50), (50, 200), (200, float("inf")))


def clinic_anomaly(kind: str, rng: np.random.Generator) -> dict:
    """One anomaly of KIND with the benchmark's clinical size range."""
    if kind in ("hypodense_lesion", "hyperdense_lesion"):
        return {"kind": kind, "radius_mm": float(rng.uniform(4.0, 15.0)), "region": "liver"}
    if kind == "metal_stent":
        return {"kind": kind, "radius_mm": float(rng.uniform(1.5, 3.0))}
    return {"kind": kind, "radius_mm": float(rng.uniform(1.5, 10.0))}


TEST_COUNTS = {"train": 24, "test_normal": 16, "per_kind": 24}
"""Subjects per set. 24 per anomaly type give 80-700 anomalous slices per type: with the 6 of earlier
runs (20 hypodense slices) an AUROC moved by 0.07 from one subject draw to the next. Each set's subjects
come from one seeded stream, so a larger set keeps the smaller one's subjects."""
CHECKPOINT_EVERY = 500  # steps; `--resume` continues a training cut off mid-way from the last one


TUNING_COUNTS = {"test_normal": 8, "per_kind": 12}
"""Subjects per set of the tuning set: the sets on which scoring choices are made (`score_variants.py
--tuning`), drawn like the test sets from other seed streams, so that the test sets judge the choice."""
SEEDS = {"train": 1000, "test_normal": 2000, "per_kind": 3000}
TUNING_SEEDS = {"test_normal": 9000, "per_kind": 9001}
"""First seed of each set's stream; anomaly type k draws from `per_kind` + k."""


def make_phantom_sets(folder: Path, smoke: bool, tuning: bool = False) -> dict:
    """Write the phantom sets (once; reused when complete) and return their folders. With `tuning`, the
    tuning set instead: normal and anomalous test-like sets of other seeds, and no training set."""
    size, slices = (128, 24) if smoke else (256, 48)
    spacing = (1.5 * 256 / size, 1.5 * 256 / size, 5.0 * 48 / slices)
    counts = {"train": 6, "test_normal": 2, "per_kind": 2} if smoke else TEST_COUNTS
    seeds = SEEDS
    if tuning:
        counts = {"test_normal": 2, "per_kind": 2} if smoke else TUNING_COUNTS
        seeds = TUNING_SEEDS
    sets = {name: folder / name for name in ("train", "test_normal") if name in counts}
    sets.update({kind: folder / f"test_{kind}" for kind in ANOMALY_KINDS})
    done = folder / "complete.json"
    if done.is_file():
        kept = json.loads(done.read_text())  # sets written before seeds were recorded used SEEDS
        if all(kept.get(k) == v for k, v in counts.items()) and kept.get("seeds", SEEDS) == seeds:
            return sets
    if folder.exists():
        shutil.rmtree(folder)
    for name in ("train", "test_normal"):
        if name in counts:
            rng = np.random.default_rng(seeds[name])
            for i in range(counts[name]):
                phantom = make_phantom(slices, size, spacing, seed=int(rng.integers(2**31)))
                phantom.save(sets[name], f"{name}_{i:03d}")
    for k, kind in enumerate(ANOMALY_KINDS):
        rng = np.random.default_rng(seeds["per_kind"] + k)
        for i in range(counts["per_kind"]):
            spec = clinic_anomaly(kind, rng)
            phantom = make_phantom(slices, size, spacing, seed=int(rng.integers(2**31)), anomalies=[spec])
            phantom.save(sets[kind], f"{KIND_LABELS[kind]}_{i:03d}")
    record = {"size": size, "slices": slices, "spacing": spacing, **counts, "seeds": seeds}
    write_json_atomic(done, record, indent=None)
    return sets


PATIENT_RADIUS_MM = {"hypodense_lesion": (3.0, 20.0), "hyperdense_lesion": (3.0, 20.0), "metal_stent": (1.0, 4.0),
                     "fluid": (1.0, 12.0)}  # fmt: skip
PATIENT_KIND_SHARES = {"hypodense_lesion": 0.4, "hyperdense_lesion": 0.2, "metal_stent": 0.2, "fluid": 0.2}


def make_extra_sets(folder: Path, smoke: bool) -> dict:
    """The training inputs besides the normal scans that some backends take (written once, reused):

    - `unlabelled`: the test set's unlabelled training counterpart: new subjects, normal and with one
      anomaly each in the test's proportions and clinical sizes (4 normal, 2 per type; masks not used);
    - `patients`: labelled abnormal subjects with another seed and another anomaly mix than the test:
      two anomalies each, the type drawn with PATIENT_KIND_SHARES, sizes from PATIENT_RADIUS_MM (wider
      than the test's); their anomaly masks mark the abnormal slices (8 subjects)."""
    size, slices = (128, 24) if smoke else (256, 48)
    spacing = (1.5 * 256 / size, 1.5 * 256 / size, 5.0 * 48 / slices)
    sets = {"unlabelled": folder / "unlabelled", "patients": folder / "patients"}
    done = folder / "extra_complete.json"
    if done.is_file():
        return sets
    for path in sets.values():
        if path.exists():
            shutil.rmtree(path)
    normal, per_kind, patients = (2, 1, 4) if smoke else (4, 2, 8)
    rng = np.random.default_rng(5000)
    for i in range(normal):
        make_phantom(slices, size, spacing, seed=int(rng.integers(2**31))).save(
            sets["unlabelled"], f"unlabelled_n{i:03d}"
        )
    for kind in ANOMALY_KINDS:
        for i in range(per_kind):
            spec = clinic_anomaly(kind, rng)
            phantom = make_phantom(slices, size, spacing, seed=int(rng.integers(2**31)), anomalies=[spec])
            phantom.save(sets["unlabelled"], f"unlabelled_{KIND_LABELS[kind]}_{i:03d}")
    rng = np.random.default_rng(6000)
    kinds, shares = list(PATIENT_KIND_SHARES), list(PATIENT_KIND_SHARES.values())
    for i in range(patients):
        specs = []
        for kind in rng.choice(kinds, size=2, p=shares):
            spec = {"kind": str(kind), "radius_mm": float(rng.uniform(*PATIENT_RADIUS_MM[kind]))}
            if kind in ("hypodense_lesion", "hyperdense_lesion"):
                spec["region"] = str(rng.choice(["liver", "spleen", "kidney_left", "kidney_right"]))
            specs.append(spec)
        make_phantom(slices, size, spacing, seed=int(rng.integers(2**31)), anomalies=specs).save(
            sets["patients"], f"patient_{i:03d}"
        )
    write_json_atomic(done, {"normal": normal, "per_kind": per_kind, "patients": patients}, indent=None)
    return sets


def make_real_ct_sets(folder: Path, sample: Path, copies: int) -> dict:
    """lung1 (training, with its tumour label so those slices are left out) and lung2 with inserted copies."""
    from fetch_sample_data import fetch_pyradiomics_data

    fetch_pyradiomics_data(sample)
    train = folder / "train"
    inserted = folder / "inserted"
    done = folder / "complete.json"
    if not done.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        train.mkdir(parents=True)
        inserted.mkdir()
        for name in ("lung1_image.nrrd", "lung1_label.nrrd"):
            shutil.copy(sample / name, train / name)
        image = sitk.ReadImage(str(sample / "lung2_image.nrrd"))
        array = sitk.GetArrayFromImage(image)
        rng = np.random.default_rng(4000)
        for kind in ANOMALY_KINDS:
            for c in range(copies):
                spec = clinic_anomaly(kind, rng)
                volume, mask = insert_anomaly(array, kind, rng, spacing=image.GetSpacing(), radius_mm=spec["radius_mm"])
                for data, suffix in ((volume, ""), (mask.astype(np.uint8), "_anomaly")):
                    out = sitk.GetImageFromArray(data)
                    out.CopyInformation(image)
                    write_image_atomic(out, inserted / f"lung2_{KIND_LABELS[kind]}_{c}{suffix}.nrrd")
        write_json_atomic(done, {"copies": copies}, indent=None)
    return {"train": train, "lung2": sample / "lung2_image.nrrd", "lung2_label": sample / "lung2_label.nrrd",
            "inserted": inserted}  # fmt: skip


def train_backend(
    backend: str,
    data: Path,
    out: Path,
    minutes: float,
    replay: dict,
    device: str,
    settings: dict,
    extra=None,
    resume=False,
    seed: int = 0,
    recalibrate=False,
) -> dict:
    """Train one backend within the budget (or with the replayed step counts) with its default architecture
    and options but for `settings` ({field: value}) and training `seed`; returns its training record. With
    `resume`, a bundle already at `out` (a run that was cut off after training it) is kept, and a training
    cut off mid-way continues from its checkpoint; with `recalibrate` too, a kept bundle is calibrated again
    on its own held-out subjects (`training.recalibrate_held_out`)."""
    from AnomalyFlagLib.training import recalibrate_held_out, train

    cls = backend_class(backend)
    architecture, options = cls.Architecture(), cls.Options()
    for name, value in settings.items():
        config = architecture if hasattr(architecture, name) else options
        if not hasattr(config, name):
            raise SystemExit(f"--set {backend}.{name}: backend '{backend}' has no option '{name}'")
        kind = type(getattr(config, name))
        setattr(config, name, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    max_minutes = minutes
    if replay:
        for stage in cls.stages(options):
            if stage.steps_option and stage.name in replay:
                setattr(options, stage.steps_option, int(replay[stage.name]))
        max_minutes = None
    metadata = out / "metadata.json"
    if resume and metadata.exists():
        kept = json.loads(metadata.read_text())
        steps = {stage.steps_option for stage in cls.stages(options) if stage.steps_option}
        _check_kept(kept, out, backend, architecture, options, steps if max_minutes is not None else set(), seed)
        print(f"{out}: trained already (--resume), scoring it again")
        if recalibrate:
            recalibrate_held_out(out, data, device=device)
            print(f"{out}: calibrated again on its held-out subjects with this version's flag rule")
        return _training_record(kept["training"], settings)
    train(data, out, backend, architecture, options, seed=seed, max_minutes=max_minutes, device=device, log=print,
          checkpoint_every=CHECKPOINT_EVERY, resume=resume, extra_inputs=extra)  # fmt: skip
    return _training_record(json.loads(metadata.read_text())["training"], settings)


def _check_kept(kept: dict, out: Path, backend: str, architecture, options, budgeted: set, seed: int = 0) -> None:
    """Refuse (SystemExit) a kept bundle whose backend, architecture, options or seed differ from this run's;
    step counts are not compared where the run is time-budgeted (`budgeted` names them)."""
    if kept.get("backend") != backend or not isinstance(kept.get(backend), dict):
        raise SystemExit(f"--resume: {out} holds a '{kept.get('backend')}' model, not '{backend}'; delete it.")
    kept_seed = kept.get("training", {}).get("seed", 0)
    differ = [] if kept_seed == seed else [f"seed: kept {kept_seed!r}, asked {seed!r}"]
    for block, wanted in (("architecture", architecture), ("training_options", options)):
        stored = config_from_dict(type(wanted), kept[backend].get(block, {}), f"{out}: {backend}.{block}")
        differ += [f"{name}: kept {getattr(stored, name)!r}, asked {value!r}" for name, value in vars(wanted).items()
                   if name not in budgeted and getattr(stored, name) != value]  # fmt: skip
    if differ:
        raise SystemExit(
            f"--resume: {out} was trained with other settings ({'; '.join(differ)}); delete it to retrain."
        )


def _training_record(training: dict, settings: dict) -> dict:
    return {"steps": training["steps"], "seconds": training["duration_s"],
            "calibration_slices": training["calibration_slices"], "settings": settings,
            "seed": training.get("seed", 0), "extra_inputs": training.get("extra_inputs", {}),
            "precision": training.get("precision"),
            "threads": torch.get_num_threads()}  # fmt: skip


def _score(scorer: Scorer, path: Path):
    image = sitk.ReadImage(str(path))
    return image, scorer.score(image, name=path.name)


def _mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0


def _auc(pos, neg):
    if len(pos) == 0 or len(neg) == 0:
        return None
    return slice_metrics(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))], 0.0)["auroc"]


def evaluate_phantoms(model: Path, sets: dict, device: str) -> dict:
    scorer = Scorer(model, device=device)
    threshold = scorer.calibration.threshold
    body_level = scorer.bundle.preprocess.body_threshold
    normal = []
    for path in sorted(sets["test_normal"].glob("*.nrrd")):
        if not path.name.endswith(("_anomaly.nrrd", "_organs.nrrd")):
            normal.append(_score(scorer, path)[1].slices["normalised"])
    normal = np.concatenate(normal)
    report = {"threshold": threshold, "false_flag_rate": float(np.mean(normal > threshold)),
              "normal_slices": int(normal.size), "types": {}, "roc": {}}  # fmt: skip
    for kind in ANOMALY_KINDS:
        pixels = PixelAccumulator(max_value=255 * HEATMAP_SCALE, n_bins=256)
        positives, areas = [], []
        for path in sorted(sets[kind].glob("*.nrrd")):
            if path.name.endswith(("_anomaly.nrrd", "_organs.nrrd")):
                continue
            image, result = _score(scorer, path)
            truth = _mask(path.with_name(path.name.replace(".nrrd", "_anomaly.nrrd")))
            hu = sitk.GetArrayFromImage(image).astype(np.float32)
            body = body_mask(torch.from_numpy(hu)[:, None], body_level)[:, 0].numpy()
            pixels.add(result.heatmap.astype(np.float32) * HEATMAP_SCALE, truth, roi=body)
            has = truth.any(axis=(1, 2))
            positives.append(result.slices["normalised"][has])
            sx, sy, _ = image.GetSpacing()
            areas.append(truth.sum(axis=(1, 2))[has] * sx * sy)
        pos, area = np.concatenate(positives), np.concatenate(areas)
        metrics = slice_metrics(np.r_[pos, normal], np.r_[np.ones(pos.size), np.zeros(normal.size)], threshold)
        by_area = {}
        for lo, hi in AREA_BINS_MM2:
            sel = (area >= lo) & (area < hi)
            by_area[f"{lo:g}-{hi:g} mm2"] = {"slices": int(sel.sum()), "auroc": _auc(pos[sel], normal)}
        report["types"][kind] = {
            "slice_auroc": metrics["auroc"],
            "slice_auprc": metrics["auprc"],
            "pixel_auroc": pixels.result()["pixel_auroc"],
            "sensitivity": metrics["sensitivity"],
            "anomalous_slices": int(pos.size),
            "by_cross_section": by_area,
        }
        fpr, tpr, _ = roc_curve(np.r_[pos, normal], np.r_[np.ones(pos.size), np.zeros(normal.size)])
        report["roc"][kind] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return report


def evaluate_real_ct(model: Path, real: dict, device: str) -> dict:
    scorer = Scorer(model, device=device)
    _, lung2 = _score(scorer, real["lung2"])
    base = lung2.slices["normalised"]
    tumour = _mask(real["lung2_label"]).any(axis=(1, 2))
    report = {
        "tumour_auroc": _auc(base[tumour], base[~tumour]),
        "tumour_slices": int(tumour.sum()),
        "tumour_sensitivity": float(np.mean(base[tumour] > scorer.calibration.threshold)),
        "false_flag_rate_lung2_normal_slices": float(np.mean(base[~tumour] > scorer.calibration.threshold)),
        "inserted": {},
    }
    fpr, tpr, _ = roc_curve(base, tumour)
    report["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    for kind in ANOMALY_KINDS:
        wins, pairs = 0, 0
        for path in sorted(real["inserted"].glob(f"lung2_{KIND_LABELS[kind]}_*.nrrd")):
            if path.name.endswith("_anomaly.nrrd"):
                continue
            _, result = _score(scorer, path)
            has = _mask(path.with_name(path.name.replace(".nrrd", "_anomaly.nrrd"))).any(axis=(1, 2))
            wins += int(np.sum(result.slices["normalised"][has] > base[has]))
            pairs += int(has.sum())
        report["inserted"][kind] = {"pairs": pairs, "above_unmodified": wins / pairs if pairs else None}
    return report


def write_png(path: Path, results: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    backends = list(results)
    columns = list(ANOMALY_KINDS) + ["real CT tumour"]
    fig = Figure(figsize=(3.2 * len(columns), 3.1 * len(backends)), dpi=90)
    FigureCanvasAgg(fig)
    for r, backend in enumerate(backends):
        res = results[backend]
        for c, column in enumerate(columns):
            ax = fig.add_subplot(len(backends), len(columns), r * len(columns) + c + 1)
            if column in ANOMALY_KINDS:
                ph = res.get("phantoms") or {"roc": {}, "types": {}}
                roc, auc = ph["roc"].get(column), ph["types"].get(column, {}).get("slice_auroc")
            else:
                roc, auc = (res.get("real_ct") or {}).get("roc"), (res.get("real_ct") or {}).get("tumour_auroc")
            if roc:
                ax.plot(roc["fpr"], roc["tpr"], color="tab:blue")
            ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
            ax.set_title(f"{backend}: {KIND_LABELS.get(column, column)}\nAUROC {auc:.3f}" if auc is not None
                         else f"{backend}: {KIND_LABELS.get(column, column)}\nnot in this run", fontsize=9)  # fmt: skip
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.tick_params(labelsize=7)
            if r == len(backends) - 1:
                ax.set_xlabel("false-flag rate", fontsize=8)
            if c == 0:
                ax.set_ylabel("sensitivity", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp)


def markdown(results: dict) -> str:
    lines = ["| backend | type | slice AUROC | slice AUPRC | pixel AUROC | sensitivity | false-flag rate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for backend, res in results.items():
        ph = res.get("phantoms") or {"types": {}}
        for kind in ph["types"]:
            t = ph["types"][kind]
            lines.append(f"| {backend} | {KIND_LABELS[kind]} | {f(t['slice_auroc'])} | {f(t['slice_auprc'])} | "
                         f"{f(t['pixel_auroc'])} | {f(t['sensitivity'])} | {f(ph['false_flag_rate'])} |")  # fmt: skip
        real = res.get("real_ct")
        if real and "not_run" in real:
            lines.append(f"| {backend} | real CT: not run ({real['not_run']}) | | | | | |")
        elif real:
            ins = ", ".join(f"{KIND_LABELS[k]} {f(v['above_unmodified'])}" for k, v in real["inserted"].items())
            lines.append(f"| {backend} | real CT: lung2 tumour AUROC {f(real['tumour_auroc'])}; inserted above "
                         f"unmodified: {ins} | | | | | {f(real['false_flag_rate_lung2_normal_slices'])} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per backend and data set")
    parser.add_argument("--smoke", action="store_true", help="small data and a 1-minute budget (a quick check)")
    parser.add_argument("--backends", default=",".join([DEFAULT_BACKEND] + sorted(set(BACKENDS) - {DEFAULT_BACKEND})))
    parser.add_argument("--no-real-ct", action="store_true", help="phantoms only")
    parser.add_argument("--no-phantoms", action="store_true", help="real CT only")
    parser.add_argument("--replay", help="quality.json of an earlier run: train with its step counts")
    parser.add_argument("--data", default=str(ROOT / "data" / "quality"))
    parser.add_argument("--output", default=str(ROOT / "reports" / "quality"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true",
                        help="a cut-off run: keep the models it trained in --output and score them again; continue "
                        "a training cut off mid-way from its last checkpoint")  # fmt: skip
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --resume: calibrate the kept models again on their held-out subjects with "
                        "this version's flag rule before scoring them (no retraining)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed: initialisation, batches, which training subjects calibrate")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="BACKEND.OPTION=VALUE",
                        help="train BACKEND with this architecture or training option set (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.recalibrate and not args.resume:
        parser.error("--recalibrate calibrates the models that --resume keeps: give both")
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        backend, _, name = key.partition(".")
        if not (value and name):
            parser.error(f"--set {item}: expected BACKEND.OPTION=VALUE")
        settings.setdefault(backend, {})[name] = value
    minutes = 1.0 if args.smoke and args.minutes == 30.0 else args.minutes
    data, out = Path(args.data) / ("smoke" if args.smoke else "full"), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    replay = {}
    if args.replay:  # {backend: {"phantoms" | "real_ct": {"steps": {stage: steps}}}}
        earlier = json.loads(Path(args.replay).read_text())["results"]
        replay = {b: {k: r.get(f"training_{k}", {}) for k in ("phantoms", "real_ct")} for b, r in earlier.items()}
    sets = None if args.no_phantoms else make_phantom_sets(data / "phantoms", args.smoke)
    real = None
    if not args.no_real_ct:
        real = make_real_ct_sets(data / "real_ct", ROOT / "data" / "sample", 1 if args.smoke else 3)
    results = {}
    for backend in args.backends.split(","):
        res = results[backend] = {}
        steps = {key: replay.get(backend, {}).get(key, {}).get("steps") for key in ("phantoms", "real_ct")}
        needs = [t.name for t in backend_class(backend).training_inputs]
        if not args.no_phantoms:
            extra = make_extra_sets(data / "phantoms_extra", args.smoke) if needs else {}
            model = out / "models" / f"phantom_{backend}"
            res["training_phantoms"] = train_backend(
                backend, sets["train"], model, minutes, steps["phantoms"], args.device, settings.get(backend, {}),
                {name: extra[name] for name in needs}, resume=args.resume, seed=args.seed, recalibrate=args.recalibrate,
            )  # fmt: skip
            res["phantoms"] = evaluate_phantoms(model, sets, args.device)
        if real and needs:  # the only other real scan is the test patient
            res["real_ct"] = {"not_run": f"no real scans for --{', --'.join(needs)} besides the test patient lung2"}
        elif real:
            model = out / "models" / f"lung1_{backend}"
            res["training_real_ct"] = train_backend(
                backend, real["train"], model, minutes, steps["real_ct"], args.device, settings.get(backend, {}),
                resume=args.resume, seed=args.seed, recalibrate=args.recalibrate,
            )  # fmt: skip
            res["real_ct"] = evaluate_real_ct(model, real, args.device)
        write_json_atomic(out / "quality.json", {"minutes": minutes, "smoke": args.smoke, "results": results}, indent=1)
        print(markdown({backend: res}), flush=True)
    write_png(out / "quality.png", results)
    print(markdown(results))
    print(f"Report: {out / 'quality.json'} and {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
