"""Python packages that AnomalyFlag needs inside Slicer, and their installation on first use.

Importing this file imports neither torch nor MONAI, and nothing is installed at import time. The module
calls :func:`missingDependencies` before it scores; when something is missing it calls
:func:`installDependencies`, which asks the user first, installs torch through the PyTorch extension
(``PyTorchUtils``, so that the torch build matches the GPU driver) and the pure-Python packages with
``slicer.packaging.pip_ensure`` (Slicer 5.12 and later) or ``slicer.util.pip_install`` (earlier).
SimpleITK and numpy ship with Slicer and are not checked.

Slicer is imported only inside the functions that need it, so the checks also run in plain Python.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import re
from typing import Callable, List, Optional

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4, or plain Python

    def _(text):
        return text


TORCH_MINIMUM_VERSION = "2.1"
TORCH_REQUIREMENT = ">=" + TORCH_MINIMUM_VERSION

# (import name, distribution name, minimum version); torch first: it is installed differently.
REQUIREMENTS = (
    ("torch", "torch", TORCH_MINIMUM_VERSION),
    ("monai", "monai", "1.3"),
    ("safetensors", "safetensors", "0.4"),
)

REQUESTER = "AnomalyFlag"


class DependencyInstallError(RuntimeError):
    """A required package could not be installed; the message says which and what to do."""


def requirementString(distribution: str, minimum: str) -> str:
    return f"{distribution}>={minimum}"


def _versionTuple(text: str):
    """Numeric release part of a version string ('2.1.0+cu121' -> (2, 1, 0))."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not match:
        return ()
    return tuple(int(part) for part in match.group(1).split("."))


def _versionAtLeast(installed: str, minimum: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version

        try:
            # Compare releases only, so that local builds such as 2.1.0+cpu count as 2.1.0.
            return Version(installed).release >= Version(minimum).release
        except InvalidVersion:
            pass
    except ImportError:
        pass
    found, wanted = _versionTuple(installed), _versionTuple(minimum)
    width = max(len(found), len(wanted))
    return found + (0,) * (width - len(found)) >= wanted + (0,) * (width - len(wanted))


def _installedVersion(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _moduleAvailable(module: str) -> bool:
    """Whether `module` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missingDependencies() -> List[str]:
    """Requirements ('monai>=1.3', ...) that are not importable or older than needed.

    Uses ``importlib.util.find_spec`` and package metadata only: nothing is imported, so an installed
    but broken torch does not get loaded (and locked) by the check.
    """
    importlib.invalidate_caches()
    missing = []
    for module, distribution, minimum in REQUIREMENTS:
        if not _moduleAvailable(module):
            missing.append(requirementString(distribution, minimum))
            continue
        version = _installedVersion(distribution)
        if version is not None and not _versionAtLeast(version, minimum):
            missing.append(requirementString(distribution, minimum))
    return missing


def _defaultConfirm(text: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install AnomalyFlag dependencies")))


def confirmationText(missing: List[str]) -> str:
    return _(
        "AnomalyFlag needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
        "They will be downloaded and installed into Slicer's Python environment. PyTorch is installed "
        "through the PyTorch extension, which picks the build that matches the GPU driver. This can take "
        "several minutes and needs an internet connection.\n\nInstall them now?"
    ).format(packages="\n".join("  - " + item for item in missing))


def _installTorch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyInstallError(
            _(
                "PyTorch is needed but the PyTorch extension (module PyTorchUtils) is not available. "
                "Install the 'PyTorch' extension from the Extensions Manager, restart Slicer and try again."
            )
        ) from None
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
        )
    except Exception as exc:
        raise DependencyInstallError(
            _(
                "Installing PyTorch {requirement} failed: {error}\n"
                "Open the PyTorch Utils module to install it by hand (choose the computation backend that "
                "matches the GPU), restart Slicer and try again."
            ).format(requirement=TORCH_REQUIREMENT, error=exc)
        ) from exc
    if torch is None:
        raise DependencyInstallError(
            _("PyTorch {requirement} was not installed; AnomalyFlag cannot score without it.").format(
                requirement=TORCH_REQUIREMENT
            )
        )


def _pipEnsureFunction():
    """slicer.packaging.pip_ensure on Slicer 5.12 and later, else None."""
    try:
        packagingModule = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return getattr(packagingModule, "pip_ensure", None)


def _asRequirements(requirements: List[str]):
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return list(requirements)
    return [Requirement(text) for text in requirements]


def _pipInstall(requirements: List[str]) -> None:
    import slicer

    try:
        pipEnsure = _pipEnsureFunction()
        if pipEnsure is not None:
            # The user has already agreed (installDependencies asks once for everything).
            pipEnsure(_asRequirements(requirements), prompt_install=False, requester=REQUESTER)
        else:
            slicer.util.pip_install(" ".join(requirements))
    except Exception as exc:
        raise DependencyInstallError(
            _(
                "Installing {packages} failed: {error}\nCheck the internet connection and the Python console log."
            ).format(packages=", ".join(requirements), error=exc)
        ) from exc


def installDependencies(confirm: Optional[Callable[[str], bool]] = None) -> bool:
    """Install what :func:`missingDependencies` reports, after asking.

    :param confirm: called with the question text; returns True to go ahead. Defaults to
        ``slicer.util.confirmOkCancelDisplay``.
    :returns: True when everything is installed (or already was); False when the user declined, in
        which case nothing was installed.
    :raises DependencyInstallError: when an installation fails or leaves a requirement unmet.
    """
    missing = missingDependencies()
    if not missing:
        return True
    confirm = confirm or _defaultConfirm
    if not confirm(confirmationText(missing)):
        logging.info("AnomalyFlag: installation of %s declined by the user", ", ".join(missing))
        return False
    torchRequirement = requirementString("torch", TORCH_MINIMUM_VERSION)
    if torchRequirement in missing:
        logging.info("AnomalyFlag: installing PyTorch %s through PyTorchUtils", TORCH_REQUIREMENT)
        _installTorch()
    others = [item for item in missing if item != torchRequirement]
    if others:
        logging.info("AnomalyFlag: installing %s", ", ".join(others))
        _pipInstall(others)
    stillMissing = missingDependencies()
    if stillMissing:
        raise DependencyInstallError(
            _(
                "These packages are still missing after installation: {packages}. "
                "Restart Slicer and try again; if it persists, install them from the Python console with "
                "slicer.util.pip_install."
            ).format(packages=", ".join(stillMissing))
        )
    return True
