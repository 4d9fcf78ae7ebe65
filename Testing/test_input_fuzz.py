"""Seeded fuzzing of input volumes through `anomalyflag score`: byte flips in headers and data, truncations
and deletions in every input format. Each mutated input is either scored (exit 0, complete outputs) or
refused (exit 2, one message naming it, no summary); damaged compressed data is never scored."""

import shutil
import time
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.io.nrrd_header import read_header
from AnomalyFlagLib.phantom import make_phantom, write_dicom_series

SEED = 20260801
PER_KIND = {"header flip": 2, "data flip": 2, "truncation": 1, "deletion": 1}
FORMATS = {  # file name: compression
    "case.nrrd": False,
    "gzip/case.nrrd": True,
    "case.nii": False,
    "case.nii.gz": True,
    "case.mha": False,
    "zlib/case.mha": True,
}


def _regions(path):
    """(end of the readable header, (first byte of the compressed stream's checked part, its last deflate
    byte) or None for raw data). Every change from the first byte on must be detected, except in the last
    deflate byte, whose padding bits nothing checks; the gzip header's time stamp is not checked either."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".nii.gz"):
        return 10, (10, len(data) - 9)  # gzip: 10 header bytes, 8 trailer bytes (CRC-32 and length)
    if name.endswith(".nii"):
        return 352, None
    if name.endswith(".nrrd"):
        offset = int(read_header(path)["_data_offset"])
        return offset, ((offset + 10, len(data) - 9) if path.parent.name == "gzip" else None)
    marker = b"ElementDataFile = LOCAL\n"
    offset = data.index(marker) + len(marker)
    return offset, ((offset + 2, len(data) - 5) if path.parent.name == "zlib" else None)  # zlib: 2 + 4


def _mutations(rng, base):
    """(kind, mutated bytes, whether the change hits compressed data) for one file."""
    data = base.read_bytes()
    header_end, compressed = _regions(base)
    out = []
    for kind, count in PER_KIND.items():
        for _ in range(count):
            buf = bytearray(data)
            lo, hi = (0, header_end) if kind == "header flip" else (header_end, len(data))
            positions = rng.integers(lo, hi, size=int(rng.integers(1, 4)))
            if kind.endswith("flip"):
                for p in positions:
                    buf[p] ^= int(rng.integers(1, 256))
            else:
                positions = positions[:1]
                end = len(buf) if kind == "truncation" else positions[0] + int(rng.integers(1, 64))
                del buf[positions[0] : end]
            detect = compressed is not None and all(compressed[0] <= p for p in positions)
            detect = detect and not (kind == "data flip" and compressed[1] in positions)
            out.append((kind, bytes(buf), detect))
    return out


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    phantom = make_phantom(num_slices=8, size=48, seed=3)
    image = sitk.GetImageFromArray(phantom.image)
    image.SetSpacing(phantom.spacing)
    image.SetOrigin((-36.0, -36.0, 50.0))
    for name, compress in FORMATS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        sitk.WriteImage(image, str(folder / name), useCompression=compress)
    write_dicom_series(image, folder / "dicom" / "case")
    for k, file in enumerate(sorted((folder / "dicom" / "case").iterdir())):  # the same bytes in every run
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        slice_ = reader.Execute()
        for key in ("0008|0012", "0008|0020"):
            slice_.SetMetaData(key, "20260801")
        for key in ("0008|0013", "0008|0030"):
            slice_.SetMetaData(key, "120000")
        slice_.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.99.2.{k + 1}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(file))
        writer.Execute(slice_)
    return folder


def _score(model, path, out, capsys):
    try:
        rc = main(["score", "--model", str(model), "--input", str(path), "--output", str(out), "--device", "cpu"])
    except (Exception, SystemExit) as exc:  # anything escaping main is what this test looks for
        capsys.readouterr()
        return f"{type(exc).__name__}: {exc}", ""
    return rc, capsys.readouterr().err


def _check(rc, err, out, input_name, label):
    """The outcome of one run: 'scored' or 'refused', or a description of what went wrong."""
    summary = out / "case_summary.json"
    if rc == 0:
        if not (summary.is_file() and (out / "case_heatmap.nrrd").is_file() and (out / "case_slices.csv").is_file()):
            return f"{label}: exit 0 without complete outputs"
        return "scored"
    if rc != 2:
        return f"{label}: {rc}"
    messages = [line for line in err.splitlines() if "FAILED:" in line or "error:" in line]
    failed = [line for line in messages if "FAILED:" in line]
    message = failed[0] if failed else (messages[0] if messages else "")
    if "Traceback" in err or len(failed) > 1 or (not failed and len(messages) != 1):
        return f"{label}: unclear messages {messages}"
    if input_name not in message:
        return f"{label}: the message does not name the input: {message}"
    if summary.exists():
        return f"{label}: exit 2 but {summary.name} was written"
    return "refused"


@pytest.mark.slow
def test_mutated_inputs_are_scored_or_refused_clearly(tiny_model, originals, tmp_path, capsys):
    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    outcomes, problems = {}, []
    runs = []
    for name in FORMATS:
        for kind, data, detect in _mutations(rng, originals / name):
            case = tmp_path / f"m{len(runs)}" / "case" / name.split("/")[-1]
            case.parent.mkdir(parents=True)
            case.write_bytes(data)
            runs.append((f"{name} {kind}", case, detect, None))
    dicom = originals / "dicom" / "case"
    files = sorted(p.name for p in dicom.iterdir())
    dicom_kinds = ("delete middle file", "delete end file", "duplicate file", "header flip", "header flip",
                   "data flip", "truncation")  # fmt: skip
    for kind in dicom_kinds:
        case = tmp_path / f"m{len(runs)}" / "case"
        shutil.copytree(dicom, case)
        victim = case / files[int(rng.integers(1, len(files) - 1))]
        expected = {"delete middle file": 2, "duplicate file": 2, "delete end file": 0}.get(kind)
        if kind == "delete middle file":
            victim.unlink()
        elif kind == "delete end file":
            (case / files[-1]).unlink()
        elif kind == "duplicate file":
            shutil.copy(victim, case / "copy.dcm")
        else:
            data = bytearray(victim.read_bytes())
            pixels = len(data) - 48 * 48 * 2  # pixel data last; before it the 128-byte preamble, "DICM" and tags
            if kind.endswith("flip"):
                lo, hi = (132, pixels) if kind == "header flip" else (pixels, len(data))
                for p in rng.integers(lo, hi, size=int(rng.integers(1, 4))):
                    data[p] ^= int(rng.integers(1, 256))
            else:
                del data[int(rng.integers(len(data) // 2, len(data))) :]
            victim.write_bytes(bytes(data))
        runs.append((f"dicom {kind}", case, expected == 2, expected))
    for i, (label, path, detect, expected) in enumerate(runs):
        out = tmp_path / f"out{i}"
        rc, err = _score(tiny_model, path, out, capsys)
        outcome = _check(rc, err, out, str(path), label)
        if outcome == "scored" and (detect or expected == 2):
            outcome = f"{label}: damaged input scored (exit 0)"
        elif outcome == "refused" and expected == 0:
            outcome = f"{label}: a valid input refused: {err.strip().splitlines()[-2:]}"
        counts = outcomes.setdefault(label.split()[0], Counter())
        counts[outcome if outcome in ("scored", "refused") else "problem"] += 1
        if outcome not in ("scored", "refused"):
            problems.append(outcome)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        table = "; ".join(f"{fmt} {dict(c)}" for fmt, c in outcomes.items())
        print(f"\ninput fuzz: {len(runs)} mutated inputs in {elapsed:.1f} s: {table}")
    assert not problems, "\n".join(problems)
    assert sum(1 for run in runs if run[2]) >= 12, "the seed should damage compressed data often"
