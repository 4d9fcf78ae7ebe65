"""Hostile inputs through `anomalyflag score`, as a user runs it: one row per input class of issue 8.

Each class is built from a phantom (or the sample brain MR, when `data/sample` holds it) in a scratch
folder, scored in a fresh process with the demo model, and classified from what the user gets: a clean
error (exit 2, one message, no traceback), a traceback (or any other exit status), a silent wrong result
(exit 0 where the input should have been refused or reported as unlike the training data), and partial
outputs (files of a failed case, or hidden leftovers, in the output folder). Prints a Markdown table.

    python scripts/robustness_report.py              # about 3 minutes on two CPU cores

The seeded fuzz and crash tests cover the same ground at volume (Testing/test_input_fuzz.py,
Testing/test_bundle_schema.py, Testing/test_output_sets.py).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "AnomalyFlag"))
from AnomalyFlagLib.phantom import make_phantom, write_dicom_series  # noqa: E402

DEMO = ROOT / "Resources" / "Models" / "AnomalyFlagDemoChestCT"


def _phantom(folder: Path, name: str, num_slices=40, spacing=(1.5, 1.5, 3.0), suffix=".nrrd", compress=False):
    image = make_phantom(num_slices, 128, spacing, seed=3).to_sitk()
    path = folder / f"{name}{suffix}"
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _flip(path: Path, start_fraction: float, count: int = 8) -> Path:
    data = bytearray(path.read_bytes())
    start = int(len(data) * start_fraction)
    for i in range(count):
        data[start + 37 * i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def build(work: Path) -> list:
    """(input class, CLI arguments after the model, expected: refuse | warn | score, resource limit)."""
    inputs = work / "inputs"
    inputs.mkdir()
    rows = []

    gz = _flip(_phantom(inputs, "corrupt_gzip", compress=True), 0.6)
    rows.append(("1 gzip NRRD with flipped bytes", ["--input", gz], "refuse", None))
    folder = inputs / "batch"
    folder.mkdir()
    shutil.copy(gz, folder / "a_corrupt.nrrd")
    _phantom(folder, "b_good")
    rows.append(("1 the same in a folder with a good case", ["--input", folder], "refuse", None))
    nii = _phantom(inputs, "corrupt_nifti", suffix=".nii.gz")
    nii.write_bytes(nii.read_bytes()[: int(nii.stat().st_size * 0.7)])
    rows.append(("1 truncated .nii.gz", ["--input", nii], "refuse", None))
    flipped = _flip(_phantom(inputs, "flipped_nifti", suffix=".nii.gz"), 0.5)
    rows.append(("1 .nii.gz with flipped bytes", ["--input", flipped], "refuse", None))

    image = make_phantom(40, 128, (1.5, 1.5, 3.0), seed=3).to_sitk()
    gap = write_dicom_series(image, inputs / "dicom_gap")
    (gap / "slice020.dcm").unlink()
    rows.append(("2 DICOM series with a slice missing", ["--input", gap], "refuse", None))
    two = write_dicom_series(image, inputs / "dicom_two")
    write_dicom_series(image[:, :, :20], inputs / "dicom_two_b", series_uid="1.2.826.0.1.3680043.2.1125.1.99.2")
    for f in (inputs / "dicom_two_b").iterdir():
        f.rename(two / f"b_{f.name}")
    rows.append(("2 DICOM folder with two series", ["--input", two], "refuse", None))

    good = _phantom(inputs, "good")
    rows.append(("5 --roi-labels abc", ["--input", good, "--roi", good, "--roi-labels", "abc"], "refuse", None))
    for margin in ("-5", "nan", "1e9"):
        rows.append((f"5 --roi-margin-mm {margin}", ["--input", good, "--roi", good, "--roi-margin-mm", margin],
                     "refuse", None))  # fmt: skip
    a_file = work / "a_file"
    a_file.write_text("x")
    rows.append(("5 output folder under a file", ["--input", good, "--output", a_file / "out"], "refuse", None))
    rows.append(("5 output folder in /proc", ["--input", good, "--output", "/proc/anomalyflag"], "refuse", None))
    rows.append(("5 output folder in /sys", ["--input", good, "--output", "/sys/anomalyflag"], "refuse", None))
    rows.append(("5 full disk (2 kB file-size limit)", ["--input", good], "refuse", 2048))
    rows.append(("5 --device cudafoo", ["--input", good, "--device", "cudafoo"], "refuse", None))

    coarse = _phantom(inputs, "spacing_50mm", num_slices=8, spacing=(50.0, 50.0, 50.0))
    rows.append(("6 50 mm voxel spacing", ["--input", coarse], "refuse", None))
    tiny = inputs / "tiny8.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (8, 8, 8)).astype(np.int16)),
                    str(tiny))  # fmt: skip
    rows.append(("6 8x8x8 volume", ["--input", tiny], "refuse", None))

    clash = inputs / "clash"
    clash.mkdir()
    _phantom(clash, "x")
    _phantom(clash, "x", suffix=".nii.gz")
    rows.append(("7 x.nrrd and x.nii.gz in one folder", ["--input", clash], "refuse", None))
    pair = inputs / "pair"
    pair.mkdir()
    _phantom(pair, "p1")
    _phantom(pair, "p2")
    rows.append(("7 one --roi file for a folder of cases", ["--input", pair, "--roi", good], "refuse", None))

    brain = ROOT / "data" / "sample" / "brain1_image.nrrd"
    if brain.is_file():
        rows.append(("9 brain MR scored with the chest CT model", ["--input", brain], "warn", None))
    rows.append(("9 abdominal phantom scored with the chest CT model", ["--input", good], "warn", None))
    chest = ROOT / "data" / "sample" / "lung2_image.nrrd"
    if chest.is_file():
        rows.append(("control: the demo's chest CT", ["--input", chest], "score", None))
    return rows


def run_row(work: Path, index: int, args: list, limit) -> dict:
    args = [str(a) for a in args]
    out = work / f"out{index}"
    if "--output" not in args:
        args += ["--output", str(out)]
    else:
        out = Path(args[args.index("--output") + 1])
    if "--device" not in args:
        args += ["--device", "cpu"]

    def set_limit():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "AnomalyFlag"))
    proc = subprocess.run([sys.executable, "-m", "AnomalyFlagLib", "score", "--model", str(DEMO), *args],
                          capture_output=True, text=True, env=env, preexec_fn=set_limit, timeout=600)  # fmt: skip
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    summaries = [json.loads((out / f).read_text()) for f in files if f.endswith("_summary.json")]
    complete = {s["case"] for s in summaries}
    partial = [f for f in files if f.startswith(".") or not any(f.startswith(f"{c}_") for c in complete)]
    warned = any(s.get("out_of_distribution") for s in summaries)
    return {"rc": proc.returncode, "stderr": proc.stderr, "warned": warned, "partial": partial}


def classify(expected: str, run: dict) -> dict:
    traceback = "Traceback" in run["stderr"] or run["rc"] not in (0, 2)
    clean = run["rc"] == 2 and not traceback
    silent = run["rc"] == 0 and (expected == "refuse" or (expected == "warn" and not run["warned"]))
    lines = [line for line in run["stderr"].splitlines() if "error:" in line or "FAILED" in line or "WARNING" in line]
    return {"clean": clean, "traceback": traceback, "silent": silent, "partial": bool(run["partial"]),
            "ok": (clean and expected == "refuse") or (run["rc"] == 0 and not silent and expected != "refuse"),
            "message": lines[0][:160] if lines else ""}  # fmt: skip


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    work = Path(tempfile.mkdtemp(prefix="anomalyflag-robustness-"))
    try:
        rows = build(work)
        print("| input class | expected | exit | as expected | clean error | traceback | silent wrong result "
              "| partial outputs | message |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        failures = 0
        for i, (name, args, expected, limit) in enumerate(rows):
            run = run_row(work, i, args, limit)
            result = classify(expected, run)
            failures += not result["ok"]
            flags = " | ".join("yes" if result[k] else "" for k in ("clean", "traceback", "silent", "partial"))
            message = result["message"].replace("|", "/").replace(str(work), "...")
            print(f"| {name} | {expected} | {run['rc']} | {'yes' if result['ok'] else 'NO'} | {flags} | {message} |")
        print(f"\n{len(rows)} input classes, {failures} not handled as expected.")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
