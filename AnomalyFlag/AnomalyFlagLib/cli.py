"""The `anomalyflag` command: train, calibrate, score, evaluate and inspect models without Slicer."""

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import AnomalyFlagError, CancelledError

EXIT_USAGE = 2
EXIT_CANCELLED = 130


def _add_device(p):
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")


def _label_values(text: str):
    from .roi import check_labels

    try:
        return check_labels([int(v) for v in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of integer labels, e.g. 1,3"
        ) from None
    except AnomalyFlagError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _failure_dice(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"a failure Dice threshold must be in (0, 1], got {text}")
    return value


def _min_voxels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of voxels") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a number of voxels cannot be negative, got {text}")
    return value


def _margin_mm(text: str) -> float:
    from .roi import check_margin_mm

    try:
        return check_margin_mm(float(text))
    except (ValueError, AnomalyFlagError) as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, AnomalyFlagError) else f"'{text}' is not a number"
        ) from None


def _add_archive_options(p) -> None:
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="score only shard I of N (0 <= I < N: every N-th case by name from the I-th), for a "
                   "scheduler's job array; `worklist --scores OUTPUT` then ranks all shards together")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="skip cases whose outputs are complete (same model and image, checksums match)")  # fmt: skip


def _shard(text: str):
    from .io.cases import parse_shard

    try:
        return parse_shard(text)
    except AnomalyFlagError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_roi_region(p, what: str) -> None:
    p.add_argument(
        "--roi-labels", type=_label_values, help=f"comma-separated label values of the {what} (default: any non-zero)"
    )
    p.add_argument(
        "--roi-margin-mm", type=_margin_mm, default=10.0, help=f"margin around the {what}, 0 to 200 mm (default 10)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyflag",
        description="Flag CT/MRI slices on which an automatic segmentation is likely to fail.",
    )
    parser.add_argument("--version", action="version", version=f"anomalyflag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .cli_options import backends_help
    from .detectors import BACKENDS, DEFAULT_BACKEND, TRAINING_INPUTS
    from .training_slices import VALIDATION_FRACTION

    p = sub.add_parser(
        "train",
        help="train a detector on NORMAL volumes and calibrate it",
        description="Train a detector backend on normal volumes only and calibrate it on held-out normal "
        "slices. Options of each backend follow the general ones; give only those of the chosen backend.",
        epilog=backends_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        help="folder of normal volumes (NRRD, NIfTI, MHA, DICOM series "
        "folders) or a MONAI-style datalist JSON; *_label/_mask volumes exclude their slices; a <case>_seg.* "
        "(or <case>.seg.nrrd) segmentation beside a case also gives the organ-aware calibration",
    )
    _add_roi_region(p, "segmentations for the organ-aware calibration")
    for extra in TRAINING_INPUTS:
        users = ", ".join(sorted(n for n, c in BACKENDS.items() if extra in c.training_inputs)) or "none yet"
        p.add_argument(f"--{extra.name}", metavar="FOLDER", help=f"{extra.help}; for backend(s): {users}")
    p.add_argument("--output", required=True, help="model bundle folder to write")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS), help="detector backend")
    p.add_argument("--modality", default="CT", type=str.upper, choices=("CT", "MR"))
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        action="append",
        metavar=("LOW", "HIGH"),
        help="an intensity window, one input channel each; repeat for several (default for CT: -160 240, "
        "-1000 1000 and 1000 3000 HU; for MR the volume's 1st-99th percentile range, as 0 1)",
    )
    p.add_argument("--image-size", type=int, default=192, help="network input size, a multiple of 16 (32-512)")
    p.add_argument("--fov-mm", type=float, default=384.0, help="in-plane field of view; 0 uses the whole slice")
    p.add_argument(
        "--no-body-centring", action="store_true", help="centre the field of view on the slice, not the body"
    )
    p.add_argument(
        "--validation-fraction", type=float, default=VALIDATION_FRACTION, help="share of cases held out for calibration"
    )
    p.add_argument("--false-flag-rate", type=float, default=0.05, help="target share of normal slices flagged")
    p.add_argument(
        "--max-minutes", type=float, help="train all stages within about this many minutes, calibration included"
    )
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUTPUT.partial")
    _add_device(p)

    p = sub.add_parser("calibrate", help="recalibrate a bundle on new NORMAL data")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="normal volumes (as for train), with <case>_seg.* for organ-aware")
    p.add_argument("--output", help="write the recalibrated bundle here instead of in place")
    _add_roi_region(p, "segmentations for the organ-aware calibration")
    p.add_argument("--false-flag-rate", type=float, default=None)
    p.add_argument("--held-out", action="store_true",
                   help="--input is the model's training input: calibrate again on the held-out slices it was "
                   "trained beside (split as training split it), with this version's flag rule")  # fmt: skip
    p.add_argument(
        "--validation-fraction", type=float, default=VALIDATION_FRACTION, help="with --held-out: as given to train"
    )
    _add_device(p)

    p = sub.add_parser("score", help="score every slice of one volume, a folder or a DICOM series")
    p.add_argument("--model", required=True, help="model bundle folder")
    p.add_argument("--input", required=True, help="volume file, folder of volumes, or DICOM series folder")
    p.add_argument("--output", required=True, help="output folder (CSV, heatmap NRRD and summary JSON per case)")
    p.add_argument(
        "--roi",
        help="segmentation or label map restricting flags and heatmap (one input volume), "
        "or a folder holding <case>.seg.nrrd / <case>_seg.* / <case>_organs.* files (default: each case's "
        "<case>_seg.* beside it); with the model's organ-aware calibration for the same labels and margin, "
        "slices inside it get the organ-aware score",
    )
    _add_roi_region(p, "ROI")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: by device)")
    p.add_argument("--montage", action="store_true", help="also write <case>_flagged.png of the top flagged slices")
    _add_archive_options(p)
    _add_device(p)

    p = sub.add_parser(
        "evaluate",
        help="score cases with ground truth (anomaly masks, or automatic + reference contours) and report metrics",
    )
    p.add_argument("--model", required=True)
    p.add_argument(
        "--input",
        required=True,
        help="folder of volumes, each with a <case>_anomaly (or _label/_mask) mask and/or the automatic "
        "segmentation <case>_seg (or <case>.seg.nrrd) and a reference contour <case>_reference",
    )
    p.add_argument(
        "--output",
        required=True,
        help="folder for evaluation.json, evaluation.png, segmentation_failure.png and case outputs",
    )
    p.add_argument("--batch-size", type=int, default=None)
    _add_device(p)
    g = p.add_argument_group("segmentation failures (cases with <case>_seg and <case>_reference)")
    g.add_argument(
        "--failure-dice",
        type=_failure_dice,
        default=0.8,
        metavar="DICE",
        help="a slice fails when the automatic contour's Dice against the reference is below this, "
        "where the reference has at least --failure-min-voxels voxels (default 0.8)",
    )
    g.add_argument(
        "--failure-min-voxels",
        type=_min_voxels,
        default=50,
        metavar="N",
        help="fewest reference voxels on a slice for the Dice rule to judge it (default 50)",
    )
    g.add_argument(
        "--no-missing-contour-failures",
        dest="missing_contour_failures",
        action="store_false",
        help="do not count as failed an automatic contour on a slice where the reference has none, "
        "or none where the reference has one (counted by default)",
    )
    g.add_argument(
        "--failure-labels",
        type=_label_values,
        default=None,
        metavar="L1,L2",
        help="label values of the structure in both files (default: any non-zero voxel)",
    )

    p = sub.add_parser("info", help="print a model bundle's metadata after verifying it")
    p.add_argument("--model", required=True)
    _add_active_learning_parsers(sub)
    _add_review_server_parser(sub)
    return parser


def _cmd_train(a):
    from .cli_options import parse_backend_options
    from .config import PreprocessConfig, ScoreConfig
    from .detectors import BACKENDS, TRAINING_INPUTS
    from .progress import ProgressBar
    from .training import train

    architecture, options = parse_backend_options(a.backend, a.backend_args)
    labels = {s.name: s.label for s in BACKENDS[a.backend].stages(options)}
    bars = {}

    def progress(stage, step, total, info):
        bars.setdefault(stage, ProgressBar(labels.get(stage, stage)))(step, total, info)

    preprocess = PreprocessConfig.for_modality(
        a.modality, a.window, image_size=a.image_size, fov_mm=a.fov_mm or None, centre_on_body=not a.no_body_centring
    )
    out = train(
        a.input,
        a.output,
        a.backend,
        architecture,
        options,
        preprocess,
        ScoreConfig(target_false_flag_rate=a.false_flag_rate),
        validation_fraction=a.validation_fraction,
        seed=a.seed,
        max_minutes=a.max_minutes,
        checkpoint_every=a.checkpoint_every,
        resume=a.resume,
        device=a.device,
        progress=progress,
        roi_labels=a.roi_labels,
        roi_margin_mm=a.roi_margin_mm,
        extra_inputs={t.name: getattr(a, t.name) for t in TRAINING_INPUTS if getattr(a, t.name)},
    )
    if out is not None:  # None: a torchrun process other than rank 0, which writes the bundle
        print(f"Model bundle written to {out}")
        _print_organ_calibration(out)


def _cmd_calibrate(a):
    from .training import recalibrate, recalibrate_held_out

    region = {"roi_labels": a.roi_labels, "roi_margin_mm": a.roi_margin_mm}
    if a.held_out:
        out = recalibrate_held_out(a.model, a.input, a.output, a.false_flag_rate, a.validation_fraction, a.device,
                                   **region)  # fmt: skip
    else:
        out = recalibrate(a.model, a.input, a.output, a.false_flag_rate, a.device, **region)
    print(f"Recalibrated bundle written to {out}")
    _print_organ_calibration(out)


def _print_organ_calibration(path) -> None:
    from .bundle import load_bundle

    bundle = load_bundle(path, device="cpu")
    body, organ = bundle.calibration, bundle.organ_calibration
    print(f"Whole-body threshold {body.threshold:.3f} ({body.num_slices} normal slices)")
    if organ is not None:
        print(f"Organ-aware threshold {organ.threshold:.3f} for {organ.describe()} ({organ.num_slices} normal "
              f"slices of {organ.num_cases} case(s) with segmentations)")  # fmt: skip


def _score_options(a):
    from .io.scored_case import ScoreOptions

    return ScoreOptions(
        roi=getattr(a, "roi", None),
        roi_labels=getattr(a, "roi_labels", None),
        roi_margin_mm=getattr(a, "roi_margin_mm", 10.0),
        montage=getattr(a, "montage", False),
        resume=getattr(a, "resume", False),
    )


def _score_cases(a, cases, out_dir, progress_label="score"):
    """Score `cases` as `anomalyflag score` does, printing a line per case; (results, failures)."""
    from .io.scored_case import score_cases
    from .progress import ProgressBar
    from .scoring import Scorer

    scorer = Scorer(a.model, device=a.device, batch_size=a.batch_size)
    bars = []

    def progress(i, case):
        bars.append(ProgressBar(f"{progress_label} {case.name}"))
        return bars[-1]

    results, failures = [], []
    try:
        for outcome in score_cases(scorer, cases, out_dir, _score_options(a), progress=progress):
            case, result = outcome.case, outcome.result
            if outcome.error is not None:
                bars[-1].close()
                failures.append((case, outcome.error))
                print(f"{case.name}: FAILED: {outcome.error}", file=sys.stderr)
                continue
            results.append((case, result))
            if outcome.skipped:
                print(f"{case.name}: outputs complete, not scored again ({outcome.summary['num_flagged']} flagged)")
                continue
            flagged = result.flagged_indices
            print(f"{case.name}: {len(flagged)} of {len(result.slices)} slices flagged"
                  f"{': ' + ', '.join(map(str, flagged)) if flagged else ''}"
                  f" ({result.timings['total']:.1f} s on {result.device})")  # fmt: skip
            if result.scan_level > 0:
                print(f"{case.name}: {result.level_text()}")
            if result.warnings:
                print(f"{case.name}: WARNING: {result.warning_text()}", file=sys.stderr)
            if outcome.images:
                print(f"{case.name}: montage of the top flagged slices in {Path(out_dir) / outcome.images[0]}")
    except CancelledError:
        if bars:
            bars[-1].close()
        raise
    return results, failures


def _cases_to_score(a):
    """The input's cases, or this process's shard of them (--shard, or its rank under torchrun, which
    also gives it its own GPU)."""
    from .io.cases import discover_cases, shard_cases
    from .launcher import Launch

    cases = discover_cases(a.input, "input")
    launch = Launch.from_environment()
    a.device = launch.device(a.device)
    shard = getattr(a, "shard", None) or ((launch.rank, launch.world_size) if launch.distributed else None)
    if shard:
        cases = shard_cases(cases, *shard)
        print(f"Shard {shard[0]} of {shard[1]}: {len(cases)} case(s)")
    return cases


def _cmd_score(a):
    out_dir = Path(a.output)
    results, failures = _score_cases(a, _cases_to_score(a), out_dir)
    if results:
        print(f"Outputs in {out_dir}")
    if failures:
        raise AnomalyFlagError(f"{len(failures)} of {len(results) + len(failures)} case(s) could not be scored.")


def _cmd_evaluate(a):
    from .evaluation.cases import FAILURE_PNG, REPORT_JSON, REPORT_PNG, evaluate_folder
    from .evaluation.segmentation_failure import FailureRule

    rule = FailureRule(a.failure_dice, a.failure_min_voxels, a.missing_contour_failures)
    report = evaluate_folder(
        a.model,
        a.input,
        a.output,
        device=a.device,
        batch_size=a.batch_size,
        failure_rule=rule,
        failure_labels=a.failure_labels,
    )
    s, p, f = report["slice"], report["pixel"], report.get("segmentation_failure")
    pictures = []
    if s is not None:
        print(
            f"slice AUROC {s['auroc']}, AUPRC {s['auprc']}, sensitivity {s['sensitivity']}, "
            f"specificity {s['specificity']}; pixel AUROC {p['pixel_auroc']}, AUPRC {p['pixel_auprc']}, "
            f"Dice {p['dice']}"
        )
        pictures.append(REPORT_PNG)
    if f is not None:
        print(
            f"segmentation failures: {f['n_failures']} of {f['n_slices']} slices in {f['n_cases']} case(s); "
            f"failure AUROC {f['failure_auroc']}, AUPRC {f['failure_auprc']}, AURC {f['aurc']:.4f} "
            f"(random {f['aurc_random']:.4f}); {f['n_flagged']} flagged, {f['failures_flagged']} of them failed "
            f"({f['flagged_per_failure_found']} flagged per failure found); mean Dice {f['mean_dice_before']:.4f} "
            f"-> {f['mean_dice_after']:.4f} recontouring the flagged (share recovered {f['dice_recovered_share']})"
        )
        pictures.append(FAILURE_PNG)
    print(f"Report: {Path(a.output) / REPORT_JSON}" + (f" and {', '.join(pictures)}" if pictures else ""))


def _cmd_info(a):
    import json

    from .bundle import load_bundle

    bundle = load_bundle(a.model)
    print(json.dumps(bundle.metadata, indent=2))


def _add_active_learning_parsers(sub):
    p = sub.add_parser("worklist", help="rank unlabelled scans by anomaly (what to label first) into worklist.csv")
    p.add_argument("--model", help="model bundle folder (to score --input)")
    p.add_argument("--input", help="volume file, folder of volumes or DICOM series folder to score")
    p.add_argument("--scores", help="rank the scored outputs in this folder instead of scoring (no --model needed)")
    p.add_argument("--images", help="folder of the source images, for the case_path column with --scores")
    p.add_argument("--output", required=True, help="folder for the case outputs and worklist.csv")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: by device)")
    _add_archive_options(p)
    _add_device(p)

    p = sub.add_parser("export-training", help="MONAI-style datalist of the recontoured cases (newest edited label)")
    p.add_argument("--input", required=True, help="outputs folder with <case>_review.json and <case>_seg_v*.seg.nrrd")
    p.add_argument("--images", help="folder of the source images, for cases whose image path was not recorded")
    p.add_argument("--output", required=True, help="datalist JSON to write (paths are relative to its folder)")


def _cmd_worklist(a):
    from .errors import InputError
    from .io.scored_case import CaseFiles, prepare_output_dir
    from .review.active_learning import WORKLIST_NAME, rank_cases, write_worklist

    out_dir = Path(a.output)
    failures = []
    if a.scores:
        if a.model or a.input:
            raise InputError("give either --scores (rank existing outputs) or --model and --input (score), not both.")
        rows = rank_cases(a.scores, images_dir=a.images)
    else:
        if not (a.model and a.input):
            raise InputError("worklist needs --model and --input to score scans, or --scores to rank scored outputs.")
        from .io.cases import discover_cases
        from .launcher import Launch

        results, failures = _score_cases(a, _cases_to_score(a), out_dir, progress_label="worklist")
        launch = Launch.from_environment()
        if launch.distributed:  # rank 0 ranks every shard's cases once all are written
            launch.barrier()
            if launch.rank != 0:
                return
            every = discover_cases(a.input, "input")
            results = [(case, None) for case in every if CaseFiles(out_dir, case.name).summary.is_file()]
        if not results:
            raise AnomalyFlagError(f"none of the {len(failures)} case(s) could be scored.")
        paths = {case.name: str(Path(case.image).resolve()) for case, _ in results}
        rows = rank_cases(out_dir, case_paths=paths, images_dir=a.images, cases=list(paths))
    path = write_worklist(rows, prepare_output_dir(out_dir) / WORKLIST_NAME)
    for r in rows[:10]:
        print(f"{r['rank']:>4}  {r['case']}: max score {r['max_normalised_score']:.2f}, "
              f"{r['flagged_slices']} flagged, mean anomalous share {r['mean_anomaly_fraction']:.3f}")  # fmt: skip
    if len(rows) > 10:
        print(f"      ... {len(rows) - 10} more")
    print(f"Worklist of {len(rows)} case(s): {path}")
    if failures:
        raise AnomalyFlagError(f"{len(failures)} of {len(rows) + len(failures)} case(s) could not be scored.")


def _cmd_export_training(a):
    from .review.active_learning import export_training_datalist

    datalist = export_training_datalist(a.input, a.output, images_dir=a.images)
    meta = datalist["metadata"]
    for skipped in meta["skipped"]:
        print(f"{skipped['case']}: skipped: {skipped['reason']}", file=sys.stderr)
    print(f"{meta['cases_exported']} recontoured case(s) of {meta['cases_reviewed']} reviewed "
          f"({meta['recontoured_slices']} recontoured slices) written to {a.output}")  # fmt: skip


REVIEW_SERVER_MODULE = "AnomalyFlagWeb"
"""The browser review app (a package beside the Slicer module's, with the `review-server` extra). The library
does not import it: `review-server` runs it as its own program, `python -m AnomalyFlagWeb`."""


def _add_review_server_parser(sub):
    p = sub.add_parser("review-server", help="review flagged slices in the browser (needs the review-server extra)")
    p.add_argument("--input", required=True, help="folder of scored cases (worklist.csv or <case>_summary.json files)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--reviewer", default="", help="reviewer's name (else asked for in the page)")
    p.add_argument("--host", default="localhost",
                   help="address to bind (default localhost; any other is reached without authentication)")  # fmt: skip


def _cmd_review_server(a):
    import importlib.util
    import os

    from .errors import InputError

    if not Path(a.input).is_dir():
        raise InputError(f"'{a.input}' is not a folder of scored cases.")
    missing = [m for m in ("trame_slicer", REVIEW_SERVER_MODULE) if importlib.util.find_spec(m) is None]
    if sys.version_info < (3, 10) or missing:
        raise InputError(
            "the review server needs Python 3.10+ and the review-server extra "
            f"(missing: {', '.join(missing) or 'Python 3.10'}); from a clone: pip install -e '.[review-server]'."
        )
    argv = [sys.executable, "-m", REVIEW_SERVER_MODULE, "--input", str(a.input), "--port", str(a.port),
            "--host", a.host, "--reviewer", a.reviewer]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # the server replaces this process: one process to stop, same exit status


COMMANDS = {
    "train": _cmd_train,
    "calibrate": _cmd_calibrate,
    "score": _cmd_score,
    "evaluate": _cmd_evaluate,
    "info": _cmd_info,
    "worklist": _cmd_worklist,
    "export-training": _cmd_export_training,
    "review-server": _cmd_review_server,
}


def main(argv=None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.backend_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[args.command](args)
    except CancelledError as exc:
        print(f"anomalyflag: cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("\nanomalyflag: interrupted; no partial output was kept.", file=sys.stderr)
        return EXIT_CANCELLED
    except AnomalyFlagError as exc:
        print(f"anomalyflag {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the file system refused (permission, full disk, a file where a folder should be)
        where = f"'{exc.filename}': " if exc.filename else ""
        print(f"anomalyflag {args.command}: error: {where}{exc.strerror or exc}.", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
