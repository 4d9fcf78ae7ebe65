"""The review lock: one writer per case at a time.

`<case>_review.lock`, created with O_CREAT | O_EXCL, names the holder as JSON (pid, host, reviewer, time,
token). A lock left by a process that is no longer running on this host is taken over with a warning;
one that cannot be parsed (its writer died while creating it) after DAMAGED_LOCK_GRACE_S.

Not filelock's SoftFileLock or fasteners: their lock files cannot name the reviewer or carry the token each save checks.
"""

import json
import logging
import os
import socket
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..atomic_files import dumps_json, process_alive
from ..errors import SessionError

logger = logging.getLogger(__name__)

DAMAGED_LOCK_GRACE_S = 60.0
"""A lock file that cannot be parsed (its writer died while creating it) is taken over after this age."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_lock(lock_path) -> Optional[dict]:
    """The holder recorded in a lock file: {pid, host, reviewer, time, token}, {} when it cannot be
    parsed, None when there is no lock."""
    try:
        raw = Path(lock_path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    if not info:
        return "an unknown process (the lock file cannot be read)"
    return (
        f"{info.get('reviewer', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {info.get('time', '?')})"
    )


def _is_stale(info: dict, lock_path: Path) -> bool:
    if not info:
        try:
            return time.time() - lock_path.stat().st_mtime > DAMAGED_LOCK_GRACE_S
        except OSError:
            return False
    if info.get("host") != socket.gethostname():
        return False
    try:
        return not process_alive(int(info.get("pid")))
    except (TypeError, ValueError):
        return False


def _take_over(lock_path: Path, stale_bytes: bytes) -> bool:
    """Move a stale lock aside; True when the file moved was the one judged stale."""
    aside = lock_path.with_name(f".{lock_path.name}.stale{os.getpid()}")
    try:
        os.replace(lock_path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = aside.read_bytes()
    except OSError:
        moved = None
    if moved == stale_bytes:
        aside.unlink()
        return True
    try:  # someone took it over in between: put their lock back
        os.link(aside, lock_path)
    except OSError:
        pass
    aside.unlink()
    return False


def acquire_lock(lock_path: Path, case: str, reviewer: str) -> dict:
    """Take CASE's lock for `reviewer` (a stale one is taken over); returns the holder info written."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "reviewer": reviewer,
        "time": utc_now(),
        "token": uuid.uuid4().hex,
    }
    for _ in range(5):
        try:
            fd = os.open(str(lock_path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                stale_bytes = lock_path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError:
                stale_bytes = b""
            holder = read_lock(lock_path)
            if holder is None:
                continue
            if not _is_stale(holder, lock_path):
                raise SessionError(
                    f"case '{case}' is being reviewed by {describe_holder(holder)}; only one reviewer can "
                    f"write a session at a time. If that session is no longer running, delete '{lock_path}'."
                ) from None
            message = (
                f"taking over the review lock of case '{case}' left by {describe_holder(holder)}, "
                "which is no longer running"
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
            _take_over(lock_path, stale_bytes)
            continue
        except OSError as exc:
            raise SessionError(
                f"the output folder '{lock_path.parent}' is not writable ({exc.strerror or exc}); review "
                "decisions could not be saved there. Choose a writable folder or fix its permissions."
            ) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(dumps_json(info))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            try:
                lock_path.unlink()
            except OSError:
                pass
            raise SessionError(
                f"cannot write the review lock '{lock_path}' ({exc.strerror or exc}); the output folder "
                "is not usable for saving review decisions."
            ) from None
        return info
    raise SessionError(f"could not take the review lock '{lock_path}'; another reviewer may be opening it.")


def release_lock(lock_path: Path, token: str) -> None:
    """Remove the lock if it is still the one taken with `token`."""
    holder = read_lock(lock_path)
    if holder and holder.get("token") == token:
        try:
            lock_path.unlink()
        except OSError:
            pass
