"""Shared by the tests of the Slicer module: where its files are, parsers of its .ui, CMake and Python files
(text in, facts out, so that negative controls can feed them broken copies), and the fixture that imports
AnomalyFlag.py on real MRML (slicer-core) with stand-ins for Slicer's Qt side."""

import ast
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AnomalyFlag"
MODULE_FILE = MODULE_DIR / "AnomalyFlag.py"
DEPENDENCIES_FILE = MODULE_DIR / "AnomalyFlagDependencies.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AnomalyFlag.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
PACKAGES = ("AnomalyFlagLib", "AnomalyFlagMRML", "AnomalyFlagWidgets")
"""The packages of the Slicer module (shipped by its CMakeLists.txt, imported by Slicer's Python)."""
WEB_PACKAGE = "AnomalyFlagWeb"
"""The browser review app: beside the module's packages, never shipped in the extension nor imported by Slicer
(it needs trame-slicer and Python 3.10+); installed by pip with the review-server extra."""
REVIEW_SECTION_FILE = MODULE_DIR / "AnomalyFlagWidgets" / "reviewSection.py"
GUI_FILES = (MODULE_FILE, REVIEW_SECTION_FILE)
"""The files that bind the panel's widgets (self.ui.<name>)."""


def python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def ui_widgets(ui_text: str) -> dict:
    """{widget name: class} of every widget in a Qt Designer file."""
    root = ET.fromstring(ui_text)
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def self_ui_names(py_source: str) -> set:
    """Names used as self.ui.<name> (or getattr(self.ui, "<name>")) in a module file."""
    names = set()
    for node in ast.walk(ast.parse(py_source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Attribute)
            and node.args[0].attr == "ui"
            and isinstance(node.args[1], ast.Constant)
        ):
            names.add(node.args[1].value)
    return names


def _decorator_names(cls: ast.ClassDef) -> set:
    out = set()
    for dec in cls.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        out.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None))
    return out


def parameter_node_fields(py_source: str) -> dict:
    """{field: annotation source} of the @parameterNodeWrapper class in a module file."""
    tree = ast.parse(py_source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and "parameterNodeWrapper" in _decorator_names(n)]
    assert len(classes) == 1, "exactly one @parameterNodeWrapper class is expected"
    return {
        stmt.target.id: ast.unparse(stmt.annotation)
        for stmt in classes[0].body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    }


def class_def(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def method_def(cls, name):
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


_CMAKE_SET = re.compile(r"\bset\(\s*(\w+)((?:\s+(?:\"[^\"]*\"|[^\s\")]+))*)\s*\)", re.IGNORECASE)


def strip_cmake_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def cmake_sets(text: str) -> dict:
    """{variable: [values]} of every set() in a CMake file, with ${VAR} references expanded."""
    raw = {}
    for match in _CMAKE_SET.finditer(strip_cmake_comments(text)):
        raw[match.group(1)] = [v.strip('"') for v in re.findall(r"\"[^\"]*\"|[^\s\"]+", match.group(2))]

    def expand(value, depth=0):
        def sub(m):
            name = m.group(1)
            if name in raw and len(raw[name]) == 1 and depth < 10:
                return expand(raw[name][0], depth + 1)
            return m.group(0)

        return re.sub(r"\$\{(\w+)\}", sub, value)

    return {name: [expand(v) for v in values] for name, values in raw.items()}


class _Stub:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _forget_module_imports():
    """Drop AnomalyFlag and its Qt-side package from sys.modules (they hold the stand-ins they were imported with)."""
    for name in [m for m in sys.modules if m == "AnomalyFlag" or m.startswith("AnomalyFlagWidgets")]:
        sys.modules.pop(name)


@pytest.fixture
def module_on_mrml(monkeypatch):
    """AnomalyFlag.py imported with real slicer MRML and stand-ins for qt, ctk and the scripted-module API."""
    pytest.importorskip("slicer")
    pytest.importorskip("slicer.util")

    def auto_module(name):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: _Stub if not attr.startswith("__") else (_ for _ in ()).throw(AttributeError)
        return module

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None})
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = _Stub
    for name, module in (("qt", auto_module("qt")), ("ctk", auto_module("ctk")),
                         ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    _forget_module_imports()
    import AnomalyFlag

    yield AnomalyFlag
    _forget_module_imports()


@pytest.fixture
def mrml_scene():
    from mrml_support import scene_fixture

    yield from scene_fixture()
