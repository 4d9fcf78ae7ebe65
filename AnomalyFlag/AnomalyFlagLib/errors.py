"""Error types: every user-facing failure names the input and the problem; text taken from files made
safe to show in a message."""


class AnomalyFlagError(Exception):
    """Base class for errors that are shown to the user as they are."""


class InputError(AnomalyFlagError):
    """An input volume, mask, folder or datalist cannot be used."""


class BundleError(AnomalyFlagError):
    """A model bundle is missing, damaged, tampered with, foreign or incompatible."""


class DeviceError(AnomalyFlagError):
    """The requested compute device is not available."""


class CancelledError(AnomalyFlagError):
    """The user cancelled a long-running operation."""


class SessionError(AnomalyFlagError):
    """A review session sidecar cannot be opened or written."""


class OutputError(AnomalyFlagError):
    """An output folder or file cannot be created or written (no permission, full disk, not a folder)."""


def itk_reason(exc: RuntimeError) -> str:
    """The last line of an ITK error, which says what went wrong, as printable text."""
    text = str(exc).strip()
    return printable(text.splitlines()[-1]) if text else "unknown error"


def printable(text: str, limit: int = 200) -> str:
    """Text taken from a file, safe to show: undecodable bytes (surrogate escapes) and control characters
    as \\xNN escapes, shortened to `limit` characters."""
    out = "".join(
        c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c) & 0xFF:02x}" for c in str(text)
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."
