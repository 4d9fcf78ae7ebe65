"""AnomalyFlagDependencies (the installer of torch, MONAI and safetensors) against a fake `slicer` module and an
in-memory package state: it asks first, installs torch through the PyTorch extension and the rest with pip
(pip_ensure from Slicer 5.12, pip_install before), says what to do when that fails, and installs nothing
when it is imported."""

import re
import subprocess
import sys
import types

import pytest
from module_support import MODULE_DIR


@pytest.fixture()
def deps(monkeypatch):
    """AnomalyFlagDependencies with an in-memory package state and a fake slicer / PyTorchUtils."""
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    sys.modules.pop("AnomalyFlagDependencies", None)
    import AnomalyFlagDependencies as module

    calls = []
    installed = {"torch": None, "monai": None, "safetensors": "0.4.5"}  # None: not installed

    monkeypatch.setattr(module, "_moduleAvailable", lambda name: installed.get(name) is not None)
    monkeypatch.setattr(module, "_installedVersion", lambda dist: installed.get(dist))

    def confirm_ok(text):
        calls.append(("confirm", text))
        return True

    def pip_install(requirements):
        calls.append(("pip_install", requirements))
        for requirement in requirements.split():
            installed[re.split(r"[<>=]", requirement)[0]] = "9.0"

    def pip_ensure(requirements, **kwargs):
        calls.append(("pip_ensure", [str(r) for r in requirements], kwargs))
        for requirement in requirements:
            installed[getattr(requirement, "name", None) or re.split(r"[<>=]", str(requirement))[0]] = "9.0"

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            installed["torch"] = "2.5.1+cu121"
            return types.SimpleNamespace(__version__="2.5.1+cu121")

    fake_slicer = types.ModuleType("slicer")
    fake_slicer.util = types.SimpleNamespace(
        pip_install=pip_install,
        confirmOkCancelDisplay=lambda text, **kw: calls.append(("confirmOkCancelDisplay", text)) or False,
    )
    fake_packaging = types.ModuleType("slicer.packaging")
    fake_packaging.pip_ensure = pip_ensure
    fake_torch_utils = types.ModuleType("PyTorchUtils")
    fake_torch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake_packaging)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake_torch_utils)
    return types.SimpleNamespace(module=module, calls=calls, installed=installed, confirm_ok=confirm_ok,
                                 fake_packaging=fake_packaging, fake_torch_utils=fake_torch_utils)  # fmt: skip


def test_missing_dependencies_in_this_environment_is_empty():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import AnomalyFlagDependencies
    finally:
        sys.path.remove(str(MODULE_DIR))
    assert AnomalyFlagDependencies.missingDependencies() == []


def test_missing_dependencies_reports_absent_and_too_old_packages(deps):
    assert deps.module.missingDependencies() == ["torch>=2.1", "monai>=1.3"]
    deps.installed.update(torch="2.0.1+cpu", monai="1.3.0", safetensors="0.3.9")
    assert deps.module.missingDependencies() == ["torch>=2.1", "safetensors>=0.4"]
    deps.installed.update(torch="2.1.0+cu121", safetensors="0.4.0")
    assert deps.module.missingDependencies() == []


def test_install_asks_first_and_does_nothing_when_declined(deps):
    asked = []
    assert deps.module.installDependencies(confirm=lambda text: asked.append(text) or False) is False
    assert len(asked) == 1 and "torch>=2.1" in asked[0] and "monai>=1.3" in asked[0]
    assert deps.calls == []
    assert deps.installed["torch"] is None


def test_install_defaults_to_slicer_confirmation_dialog(deps):
    assert deps.module.installDependencies() is False
    assert [c[0] for c in deps.calls] == ["confirmOkCancelDisplay"]


def test_install_uses_pytorchutils_with_minimum_version_then_pip_ensure(deps):
    assert deps.module.installDependencies(confirm=deps.confirm_ok) is True
    kinds = [c[0] for c in deps.calls]
    assert kinds == ["confirm", "installTorch", "pip_ensure"]
    assert deps.calls[1] == ("installTorch", False, ">=2.1")
    assert deps.calls[2][1] == ["monai>=1.3"]
    assert deps.calls[2][2]["prompt_install"] is False and deps.calls[2][2]["requester"] == "AnomalyFlag"
    assert deps.module.missingDependencies() == []


def test_install_falls_back_to_pip_install_before_slicer_5_12(deps, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.ModuleType("slicer.packaging"))  # no pip_ensure
    deps.installed["torch"] = "2.3.0"
    deps.installed["safetensors"] = None
    assert deps.module.installDependencies(confirm=deps.confirm_ok) is True
    assert deps.calls[1:] == [("pip_install", "monai>=1.3 safetensors>=0.4")]
    monkeypatch.delitem(sys.modules, "slicer.packaging")  # no slicer.packaging module at all
    deps.installed["monai"] = None
    deps.calls.clear()
    assert deps.module.installDependencies(confirm=deps.confirm_ok) is True
    assert deps.calls[1:] == [("pip_install", "monai>=1.3")]


def test_nothing_to_install_asks_nothing(deps):
    deps.installed.update(torch="2.4.0", monai="1.4.0")
    assert deps.module.installDependencies(confirm=deps.confirm_ok) is True
    assert deps.calls == []


def test_install_errors_are_typed_and_say_what_to_do(deps, monkeypatch):
    DependencyInstallError = deps.module.DependencyInstallError
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    with pytest.raises(DependencyInstallError, match="PyTorch' extension"):
        deps.module.installDependencies(confirm=deps.confirm_ok)

    deps.fake_torch_utils.PyTorchUtilsLogic.installTorch = lambda self, **kw: None
    monkeypatch.setitem(sys.modules, "PyTorchUtils", deps.fake_torch_utils)
    with pytest.raises(DependencyInstallError, match="was not installed"):
        deps.module.installDependencies(confirm=deps.confirm_ok)

    def broken(self, **kw):
        raise RuntimeError("no network")

    deps.fake_torch_utils.PyTorchUtilsLogic.installTorch = broken
    with pytest.raises(DependencyInstallError, match="no network"):
        deps.module.installDependencies(confirm=deps.confirm_ok)

    deps.installed["torch"] = "2.2.0"
    deps.fake_packaging.pip_ensure = lambda reqs, **kw: None  # "succeeds" but installs nothing
    with pytest.raises(DependencyInstallError, match="still missing"):
        deps.module.installDependencies(confirm=deps.confirm_ok)

    def failing_pip(reqs, **kw):
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    deps.fake_packaging.pip_ensure = failing_pip
    with pytest.raises(DependencyInstallError, match="monai>=1.3"):
        deps.module.installDependencies(confirm=deps.confirm_ok)


def test_importing_the_dependency_helper_installs_nothing(deps):
    sys.modules.pop("AnomalyFlagDependencies", None)
    import AnomalyFlagDependencies  # noqa: F401 - the import itself is the test

    assert deps.calls == []
