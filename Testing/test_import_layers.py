"""Import hygiene of the layers: AnomalyFlagLib imports nothing of Slicer, VTK or Qt; AnomalyFlagMRML imports
neither Qt nor the Slicer module; nothing imports a project module dynamically; every file parses as
Python 3.9; and AnomalyFlag.py loads without torch (real MRML from slicer-core, stand-ins for Slicer's Qt
side) and finds its demo model in the source tree and the installed layout."""

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from module_support import (
    DEPENDENCIES_FILE,
    MODULE_DIR,
    MODULE_FILE,
    PACKAGES,
    WEB_PACKAGE,
    parameter_node_fields,
    python_files,
)

HEAVY_MODULES = {"torch", "monai", "safetensors"}
PROJECT = ("AnomalyFlag", "AnomalyFlagDependencies") + PACKAGES + (WEB_PACKAGE,)
WEB_SIDE = {WEB_PACKAGE, "trame", "trame_slicer", "trame_server", "trame_client", "wslink"}
LAYER_RULES = {
    "AnomalyFlagLib": {"AnomalyFlag", "AnomalyFlagMRML", "AnomalyFlagWidgets", "slicer", "vtk", "vtkmodules", "qt",
                       "ctk", "PythonQt", "mrml"} | WEB_SIDE,
    "AnomalyFlagMRML": {"AnomalyFlag", "AnomalyFlagWidgets", "qt", "ctk", "PythonQt"} | WEB_SIDE,
    "AnomalyFlagWidgets": {"AnomalyFlag"} | WEB_SIDE,
    WEB_PACKAGE: {"AnomalyFlag", "AnomalyFlagWidgets", "qt", "ctk", "PythonQt"},
}  # fmt: skip
"""What the modules of each package must not import (anywhere in the file, not only at load time). The browser
app (AnomalyFlagWeb) sits beside the Slicer module: it uses the library and the bridge, never the module's Qt
side, and nothing below it (nor the module) imports it. The library's `review-server` command runs it as a
separate program (`python -m AnomalyFlagWeb`), which is no import."""


def module_level_imports(py_source: str) -> set:
    """Top-level package names imported when the file is loaded (module body, incl. try/if blocks)."""
    found = set()

    def visit(statements):
        for stmt in statements:
            if isinstance(stmt, ast.Import):
                found.update(alias.name.split(".")[0] for alias in stmt.names)
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module:
                found.add(stmt.module.split(".")[0])
            elif isinstance(stmt, (ast.Try, ast.If)):
                visit(stmt.body)
                visit(stmt.orelse)
                for handler in getattr(stmt, "handlers", []):
                    visit(handler.body)
                visit(getattr(stmt, "finalbody", []))
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                func = stmt.value.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("import_module", "__import__") and stmt.value.args:
                    arg = stmt.value.args[0]
                    if isinstance(arg, ast.Constant):
                        found.add(str(arg.value).split(".")[0])

    visit(ast.parse(py_source).body)
    return found


def _project_files():
    files = [MODULE_FILE, DEPENDENCIES_FILE]
    for package in PACKAGES + (WEB_PACKAGE,):
        files += python_files(MODULE_DIR / package)
    return files


@pytest.mark.parametrize("path", _project_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_python_files_parse_as_python_3_9(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_python_3_9_check_rejects_newer_syntax():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


BLOCKER = """
import importlib, importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked import of " + name)
        return None
sys.meta_path.insert(0, Blocker())
"""
"""Script lines that make importing a top-level package named in BLOCKED fail."""

IMPORT_BLOCKER = (
    """
import pkgutil, sys
BLOCKED = set(sys.argv[1].split(","))
"""
    + BLOCKER
    + """
sys.path.insert(0, sys.argv[2])
package = importlib.import_module(sys.argv[3])
names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "__main__")
for name in names:
    importlib.import_module(sys.argv[3] + "." + name)
print(",".join(names))
"""
)

SLICER_SIDE = "slicer,vtk,vtkmodules,qt,ctk,PythonQt,mrml"


def _import_all(folder: Path, package: str, blocked: str):
    return subprocess.run([sys.executable, "-c", IMPORT_BLOCKER, blocked, str(folder), package],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_library_imports_with_slicer_vtk_qt_ctk_blocked():
    run = _import_all(MODULE_DIR, "AnomalyFlagLib", SLICER_SIDE)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = MODULE_DIR / "AnomalyFlagLib"
    expected = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__"}
    expected |= {p.parent.name for p in folder.glob("*/__init__.py")}
    assert set(run.stdout.strip().splitlines()[-1].split(",")) == expected


def test_import_blocker_catches_a_library_module_that_imports_vtk(tmp_path):
    package = tmp_path / "LeakyLib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fine.py").write_text("import json\n")
    (package / "leaky.py").write_text("import vtk\n")
    run = _import_all(tmp_path, "LeakyLib", SLICER_SIDE)
    assert run.returncode != 0 and "blocked import of vtk" in run.stderr


def test_bridge_imports_with_qt_and_torch_blocked():
    run = _import_all(MODULE_DIR, "AnomalyFlagMRML", "qt,ctk,PythonQt,torch,monai,safetensors")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {p.stem for p in (MODULE_DIR / "AnomalyFlagMRML").glob("*.py")} - {"__init__"}
    assert set(run.stdout.strip().splitlines()[-1].split(",")) == expected


def test_web_app_imports_with_qt_blocked():
    pytest.importorskip("trame_slicer")
    run = _import_all(MODULE_DIR, WEB_PACKAGE, "qt,ctk,PythonQt")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {p.stem for p in (MODULE_DIR / WEB_PACKAGE).glob("*.py")} - {"__init__", "__main__"}
    assert set(run.stdout.strip().splitlines()[-1].split(",")) == expected


def test_slicer_module_never_imports_the_web_app():
    for path in (MODULE_FILE, DEPENDENCIES_FILE):
        assert not imported_names(path.read_text()) & WEB_SIDE, path.name


def test_module_file_imports_nothing_heavy_at_load_time():
    for path in (MODULE_FILE, DEPENDENCIES_FILE):
        heavy = module_level_imports(path.read_text()) & HEAVY_MODULES
        assert not heavy, f"{path.name} imports {sorted(heavy)} at module level"


def test_heavy_import_check_catches_module_level_torch():
    source = MODULE_FILE.read_text().replace(
        "import qt\n", "import qt\ntry:\n    import torch\nexcept ImportError:\n    pass\n", 1
    )
    assert "torch" in module_level_imports(source)
    assert "monai" in module_level_imports("from monai.networks import nets\n")


def imported_names(py_source: str) -> set:
    """Top-level names of every module a file imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(py_source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def dynamic_imports(py_source: str) -> list:
    """importlib.import_module / __import__ calls that import a project module or a name only known at run
    time (anything but a literal naming a module outside the project)."""
    found = []
    for node in ast.walk(ast.parse(py_source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("import_module", "__import__") or not node.args:
            continue
        target = node.args[0]
        literal = isinstance(target, ast.Constant) and isinstance(target.value, str)
        if not literal or target.value.split(".")[0] in PROJECT:
            found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("path", _project_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_no_dynamic_import_of_project_modules(path):
    assert dynamic_imports(path.read_text()) == []


def test_dynamic_import_check_catches_the_old_bridge_helpers():
    snippet = textwrap.dedent(
        """
        import importlib
        def _bridge(name):
            return importlib.import_module("AnomalyFlagMRML." + name)
        errors = importlib.import_module("AnomalyFlagLib.errors")
        review = __import__("AnomalyFlagMRML.review")
        packaging = importlib.import_module("slicer.packaging")
        """
    )
    assert len(dynamic_imports(snippet)) == 3


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_each_layer_imports_only_what_is_below_it(package):
    problems = {
        path.relative_to(MODULE_DIR).as_posix(): sorted(imported_names(path.read_text()) & LAYER_RULES[package])
        for path in python_files(MODULE_DIR / package)
    }
    assert {k: v for k, v in problems.items() if v} == {}


def test_layer_check_sees_imports_inside_functions():
    snippet = "def f():\n    import qt\n    from AnomalyFlag import AnomalyFlagLogic\n"
    assert imported_names(snippet) & LAYER_RULES["AnomalyFlagMRML"] == {"qt", "AnomalyFlag"}


# The module file loaded with real MRML and stand-ins for Slicer's Qt side, torch and MONAI blocked

FAKE_SLICER = (
    """
BLOCKED = {"torch", "monai", "safetensors"}
"""
    + BLOCKER
    + r"""
import json, pathlib, types

class Translated(str):
    pass

def auto_module(name):
    module = types.ModuleType(name)
    cache = {}
    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in cache:
            cache[attr] = type(attr, (), {"__init__": lambda self, *a, **k: None})
        return cache[attr]
    module.__getattr__ = __getattr__
    return module

import slicer  # slicer-core: real MRML and vtk; the application's Qt side is stood in for below
slm = types.ModuleType("slicer.ScriptedLoadableModule")
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        pass
class ScriptedLoadableModuleTest:
    pass
for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest):
    setattr(slm, cls.__name__, cls)
pnw = types.ModuleType("slicer.parameterNodeWrapper")
pnw.parameterNodeWrapper = lambda cls: cls
pnw.Choice = lambda choices: ("Choice", tuple(choices))
pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
i18n = types.ModuleType("slicer.i18n")
i18n.tr = lambda text: Translated(text)
i18n.translate = lambda context, text: Translated(text)
sys.modules.update({"slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw, "slicer.i18n": i18n,
                    "qt": auto_module("qt"), "ctk": auto_module("ctk")})

sys.path.insert(0, sys.argv[1])
import AnomalyFlag as module

parent = types.SimpleNamespace()
module.AnomalyFlag(parent)
logic = module.AnomalyFlagLogic()
default = logic.defaultModelPath()
try:
    logic.resolveModelPath("")
    resolveEmpty = "ok"
except ValueError as exc:
    resolveEmpty = "ValueError: " + str(exc)
print(json.dumps({
    "translated": {k: isinstance(getattr(parent, k), Translated) for k in ("title", "helpText", "acknowledgementText")},
    "categoryTranslated": all(isinstance(c, Translated) for c in parent.categories),
    "categories": list(parent.categories),
    "heavyLoaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "projectFrom": sorted({pathlib.Path(sys.modules[p].__file__).parent.parent.as_posix()
                           for p in ("AnomalyFlagLib", "AnomalyFlagMRML", "AnomalyFlagWidgets")}),
    "missing": module.AnomalyFlagDependencies.missingDependencies(),
    "candidates": [str(p) for p in logic.demoModelCandidates()],
    "default": None if default is None else str(default),
    "resolveEmpty": resolveEmpty,
    "resolveGiven": str(logic.resolveModelPath("/data/models/liver")),
    "parameterFields": sorted(module.AnomalyFlagParameterNode.__annotations__),
    "deviceChoices": list(module.DEVICE_CHOICES),
}))
"""
)


def _load_module_with_fakes(module_dir: Path) -> dict:
    pytest.importorskip("slicer")
    run = subprocess.run([sys.executable, "-c", FAKE_SLICER, str(module_dir)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _copy_module(target: Path) -> Path:
    """The module file, its dependency helper and its packages in `target`, as CMake installs them."""
    target.mkdir(parents=True)
    for path in (MODULE_FILE, DEPENDENCIES_FILE):
        shutil.copy(path, target / path.name)
    for package in PACKAGES:
        shutil.copytree(MODULE_DIR / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _fake_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    return folder


def test_module_loads_without_torch_and_marks_its_description_for_translation():
    report = _load_module_with_fakes(MODULE_DIR)
    assert report["heavyLoaded"] == []
    assert report["projectFrom"] == [MODULE_DIR.as_posix()]
    assert report["deviceChoices"] == ["auto", "cuda", "mps", "cpu"]  # the library's, in the GUI
    assert report["translated"] == {"title": True, "helpText": True, "acknowledgementText": True}
    assert report["categoryTranslated"] and report["categories"] == ["Segmentation"]
    assert "torch>=2.1" in report["missing"] and "monai>=1.3" in report["missing"]
    assert report["resolveGiven"] == str(Path("/data/models/liver"))
    assert report["parameterFields"] == sorted(parameter_node_fields(MODULE_FILE.read_text()))


def test_demo_model_is_found_in_the_installed_layout(tmp_path):
    # Installed extension: <ext>/lib/Slicer-X.Y/qt-scripted-modules/{AnomalyFlag.py, Resources/Models/<name>}
    scripted = _copy_module(tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules")
    bundle = _fake_bundle(scripted / "Resources" / "Models" / "AnomalyFlagDemoChestCT")
    report = _load_module_with_fakes(scripted)
    assert report["default"] == str(bundle)
    assert report["resolveEmpty"] == "ok"
    assert report["projectFrom"] == [scripted.as_posix()]


def test_demo_model_is_found_in_the_source_layout(tmp_path):
    # Source checkout: <repo>/AnomalyFlag/AnomalyFlag.py and <repo>/Resources/Models/<name>
    module_dir = _copy_module(tmp_path / "repo" / "AnomalyFlag")
    bundle = _fake_bundle(tmp_path / "repo" / "Resources" / "Models" / "AnomalyFlagDemoChestCT")
    report = _load_module_with_fakes(module_dir)
    assert report["default"] == str(bundle)
    assert report["candidates"][0] == str(module_dir / "Resources" / "Models" / "AnomalyFlagDemoChestCT")


def test_missing_demo_model_gives_a_clear_error(tmp_path):
    module_dir = _copy_module(tmp_path / "bare" / "AnomalyFlag")
    report = _load_module_with_fakes(module_dir)
    assert report["default"] is None
    assert report["resolveEmpty"].startswith("ValueError: No model folder is selected")
    assert "AnomalyFlagDemoChestCT" in report["resolveEmpty"]
