"""Error types: every user-facing failure names the input and the problem."""


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
