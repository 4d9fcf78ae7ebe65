#!/usr/bin/env python3
"""Fetch the real sample volumes shipped inside the pyradiomics 3.0.1 source archive.

The archive on PyPI holds real chest CT (lung1: 512x512x48, lung2: 512x512x61, with tumour labels; lung1
also has metal clips near the neck), brain MR (brain1, brain2) and a small breast MR crop, each as
``data/<name>_image.nrrd`` plus ``data/<name>_label.nrrd``. The volumes are never committed to this
repository; this script downloads the archive with pip, extracts only those NRRD files and checks every
file against the SHA-256 recorded below.

Usage::

    python scripts/fetch_sample_data.py                 # writes data/sample/ under the repository root
    python scripts/fetch_sample_data.py --output DIR    # anywhere else

Requires pip, numpy and setuptools in the running Python (pip runs the archive's build metadata step).
Standard library and this repository's AnomalyFlagLib.atomic_files (the files are written through
atomic_path) only otherwise; Python >= 3.9. Other code can call ``fetch_pyradiomics_data(folder)``.
"""

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

PACKAGE = "pyradiomics"
VERSION = "3.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "data" / "sample"

# SHA-256 of every file this script writes, from pyradiomics-3.0.1.tar.gz as published on PyPI.
EXPECTED_SHA256: Dict[str, str] = {
    "brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
    "brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
    "brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
    "brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
    "breast1_image.nrrd": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
    "breast1_label.nrrd": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
# SHA-256 of the source archive itself (informational: a mismatch is reported, the files decide).
ARCHIVE_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"


class FetchError(RuntimeError):
    """The sample data cannot be fetched or does not match the recorded checksums."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing_files(output_dir: Path) -> Optional[Dict[str, Path]]:
    """All expected files, when every one is present with the right checksum; otherwise None."""
    paths = {}
    for name, expected in EXPECTED_SHA256.items():
        path = output_dir / name
        if not path.is_file() or sha256_of(path) != expected:
            return None
        paths[name] = path
    return paths


def _check_build_requirements() -> None:
    missing = [m for m in ("pip", "numpy", "setuptools") if importlib.util.find_spec(m) is None]
    if missing:
        raise FetchError(
            f"{', '.join(missing)} must be installed in this Python ({sys.executable}) to download the "
            f"{PACKAGE} {VERSION} source archive (pip prepares its metadata without build isolation). "
            f"Install with: {sys.executable} -m pip install {' '.join(missing)}"
        )


def _download_archive(folder: Path) -> Path:
    _check_build_requirements()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        PACKAGE,
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(folder),
    ]
    print("Downloading the", PACKAGE, VERSION, "source archive:", " ".join(command), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} failed (exit {result.returncode}):\n{tail}")
    archives = sorted(folder.glob(f"{PACKAGE}-{VERSION}.tar.gz"))
    if not archives:
        found = ", ".join(p.name for p in folder.iterdir()) or "nothing"
        raise FetchError(f"pip download finished but no {PACKAGE}-{VERSION}.tar.gz appeared (found {found}).")
    return archives[0]


def _extract_data(archive: Path, output_dir: Path) -> Dict[str, Path]:
    """Extract data/*_image.nrrd and data/*_label.nrrd, by base name only (no paths from the archive)."""
    sys.path.insert(0, str(REPO_ROOT / "AnomalyFlag"))
    from AnomalyFlagLib.atomic_files import atomic_path  # needs numpy, checked before the download

    output_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] != "data":
                continue
            name = parts[2]
            if not (name.endswith("_image.nrrd") or name.endswith("_label.nrrd")):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = output_dir / name
            with source, atomic_path(target) as partial, open(partial, "wb") as handle:
                shutil.copyfileobj(source, handle)
            written[name] = target
    return written


def _verify(paths: Dict[str, Path]) -> None:
    missing = sorted(set(EXPECTED_SHA256) - set(paths))
    if missing:
        raise FetchError(f"The {PACKAGE} {VERSION} archive lacks {', '.join(missing)}.")
    for name, expected in EXPECTED_SHA256.items():
        actual = sha256_of(paths[name])
        if actual != expected:
            raise FetchError(f"{paths[name]} has SHA-256 {actual}, expected {expected}: the download is damaged.")


def fetch_pyradiomics_data(output_dir=DEFAULT_OUTPUT, force: bool = False, quiet: bool = False) -> Dict[str, Path]:
    """Make sure OUTPUT_DIR holds the pyradiomics sample volumes; return {file name: path}.

    Does nothing but verify checksums when all files are already there (unless FORCE). Raises FetchError.
    """
    output_dir = Path(output_dir).resolve()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if not force:
        existing = _existing_files(output_dir)
        if existing is not None:
            say(f"All {len(existing)} sample files are already in {output_dir} (checksums verified).")
            return existing
    with tempfile.TemporaryDirectory(prefix="anomalyflag-fetch-") as tmp:
        archive = _download_archive(Path(tmp))
        archive_hash = sha256_of(archive)
        if archive_hash != ARCHIVE_SHA256:
            say(f"Note: {archive.name} has SHA-256 {archive_hash}, recorded {ARCHIVE_SHA256}; checking the files.")
        written = _extract_data(archive, output_dir)
    extra = {name: path for name, path in written.items() if name not in EXPECTED_SHA256}
    _verify(written)
    for name in sorted(written):
        size_mb = written[name].stat().st_size / 1e6
        say(f"wrote {written[name]} ({size_mb:.1f} MB){'' if name not in extra else ' (not checked)'}")
    return {name: written[name] for name in sorted(written)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"folder for the NRRD files (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)} in the repository)",
    )
    parser.add_argument("--force", action="store_true", help="download again even if the files are there")
    args = parser.parse_args(argv)
    try:
        fetch_pyradiomics_data(args.output, force=args.force)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
