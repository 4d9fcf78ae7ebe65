"""Durable file replacement (a reader sees the old file or the new one, never a partial one), the one JSON
encoding of every JSON file written, and file checksums.

Every writer of the library goes through `atomic_path`: it writes a hidden temporary file (or folder)
`.NAME.tmpPID` beside the final one, which `io.scored_case.remove_leftovers` recognises once the
process is gone.
"""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path, PurePath
from typing import Optional

import numpy as np


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable; best effort (Windows and some network file systems cannot)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    """Flush a written file's data to disk (Windows flushes only through a writable handle)."""
    fd = os.open(str(path), os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        fsync_file(path)
        return
    for root, _folders, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _remove(path: Path) -> None:
    """Remove a file or folder if it is there; best effort."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:
        pass


class atomic_path:  # lower case: used like open()
    """Write `path` through a temporary file or folder: `with atomic_path(path) as tmp: <write tmp>`.

    On leaving the block normally the temporary is fsynced (a folder: every file in it, and itself),
    renamed onto `path` (an existing folder is moved aside first and removed after) and the folder
    fsynced; on an error it is removed and `path` is left as it was. `suffix` ends the temporary name,
    for writers that choose the format by extension (`.nrrd`, `.nii.gz`). Without the `with` block:
    write `tmp`, then `commit()` or `abort()`.
    """

    def __init__(self, path, suffix: str = ""):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}{suffix}")
        _remove(self.tmp)  # left by an earlier process that had this PID

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False

    def commit(self, target=None, exclusive: bool = False) -> Path:
        """Publish the temporary as `target` (default `path`) and return it. With `exclusive`, only where
        no file has that name (a hard link, or an exclusive create where the file system has no hard
        links): FileExistsError otherwise, and the temporary is kept for another target."""
        target = self.path if target is None else Path(target)
        try:
            _fsync_tree(self.tmp)
            if exclusive:
                _publish_new(self.tmp, target)
            elif self.tmp.is_dir() and target.exists():
                _swap(self.tmp, target)
            else:
                os.replace(self.tmp, target)
        except BaseException as error:
            if not (exclusive and isinstance(error, FileExistsError)):
                self.abort()
            raise
        fsync_dir(target.parent)
        return target

    def abort(self) -> None:
        """Remove the temporary; `path` stays as it was."""
        _remove(self.tmp)


def _publish_new(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)  # fails with FileExistsError rather than replacing
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first, then fill it
        os.close(os.open(str(target), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _swap(tmp: Path, target: Path) -> None:
    """Replace `target` by the folder `tmp` (a folder cannot be renamed onto an existing one)."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    _remove(old)


def write_text_atomic(path, text: str) -> Path:
    """Write `text` as UTF-8 with '\\n' line ends through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return Path(path)


def json_ready(value):
    """`value` as plain JSON data: NaN and +/-inf as None, numpy scalars and arrays as numbers and lists,
    tuples as lists, paths as strings, keys as strings."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    return value


def dumps_json(data, indent: Optional[int] = None) -> str:
    """Strict JSON text of `data` after `json_ready` (never a NaN or Infinity token)."""
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


def write_json_atomic(path, data, indent: Optional[int] = 2) -> Path:
    """`dumps_json(data, indent)` and a final newline, written through `atomic_path`."""
    return write_text_atomic(path, dumps_json(data, indent) + "\n")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (the writer of a temporary file or the holder of a lock)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
