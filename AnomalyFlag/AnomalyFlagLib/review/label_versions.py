"""Versioned edited segmentations: `<case>_seg_v{N}.seg.nrrd`, numbered from 1, never overwritten.

The original segmentation is never touched: every save of an edited label is a new file with the next
free version number. `write_new_version` publishes a finished temporary file with a hard link, which
fails instead of replacing when another writer took the same number first, so two savers can never
overwrite each other.
"""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..atomic_files import atomic_path
from ..errors import SessionError
from ..io.scored_case import LABEL_SUFFIX, CaseFiles


def list_versions(folder, case: str) -> List[Tuple[int, Path]]:
    """Existing versions of CASE's edited label in FOLDER as (version, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = CaseFiles(folder, case).label_version_pattern
    found = []
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_version(folder, case: str) -> Optional[Path]:
    """The newest edited label of CASE in FOLDER, or None when there is none."""
    versions = list_versions(folder, case)
    return versions[-1][1] if versions else None


def next_version_path(folder, case: str) -> Path:
    """The path the next version would take: one above the highest existing number (gaps are not reused)."""
    versions = list_versions(folder, case)
    return CaseFiles(folder, case).label_version(versions[-1][0] + 1 if versions else 1)


def write_new_version(folder, case: str, write: Callable[[Path], None], attempts: int = 100) -> Path:
    """Call `write(tmp_path)` to write the label to a temporary `.seg.nrrd` in FOLDER, then publish it as
    the next free version (`atomic_path`'s exclusive commit). Returns the final path; an existing file is
    never replaced."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SessionError(f"folder '{folder}' for the edited segmentation does not exist.")
    staged = atomic_path(folder / f"{CaseFiles(folder, case).case}_seg_new{LABEL_SUFFIX}", suffix=LABEL_SUFFIX)
    try:
        write(staged.tmp)
        if not staged.tmp.is_file():
            raise SessionError(f"the edited segmentation of {case} was not written to '{staged.tmp}'.")
        for _ in range(attempts):
            try:
                return staged.commit(next_version_path(folder, case), exclusive=True)
            except FileExistsError:
                continue
        raise SessionError(f"no free version number for the edited segmentation of {case} in '{folder}'.")
    except OSError as exc:
        raise SessionError(f"cannot save the edited segmentation of {case} in '{folder}': {exc}") from None
    finally:
        staged.abort()
