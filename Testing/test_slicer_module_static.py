"""Checks of the Slicer module and extension packaging that run without the Slicer application.

The module file, its .ui, the CMake lists and the Extensions Index entry are read as text/AST/XML; the
module is also imported once with small stand-ins for Slicer's Qt-side modules (qt, ctk, slicer's
ScriptedLoadableModule and parameterNodeWrapper), with torch and MONAI blocked, to show that it loads
without them and finds its demo model in both the source tree and the installed layout. The dependency
installer is exercised against a fake `slicer` module. Each check has a negative control where that is
cheap, so that a broken file would really be caught.
"""

import ast
import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AnomalyFlag"
MODULE_FILE = MODULE_DIR / "AnomalyFlag.py"
DEPENDENCIES_FILE = MODULE_DIR / "AnomalyFlagDependencies.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AnomalyFlag.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG_ENTRY = ROOT / "AnomalyFlag.json"
SCHEMA_NAME = "slicer-extension-catalog-entry-schema-v1.0.2.json"
PACKAGES = ("AnomalyFlagLib", "AnomalyFlagMRML")
REPOSITORY_URL = "https://github.com/anomalyflag/SlicerAnomalyFlag"
RAW_URL_PREFIX = "https://raw.githubusercontent.com/anomalyflag/SlicerAnomalyFlag/main/"
HEAVY_MODULES = {"torch", "monai", "safetensors", "SimpleITK", "AnomalyFlagLib", "AnomalyFlagMRML"}


# --------------------------------------------------------------------------------------------------
# Parsing helpers (text in, facts out, so that negative controls can feed them broken copies)


def ui_widgets(ui_text: str) -> dict:
    """{widget name: class} of every widget in a Qt Designer file."""
    root = ET.fromstring(ui_text)
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_widget_properties(ui_text: str, property_name: str) -> dict:
    """{widget name: list of the <string> values of its property `property_name`} (widgets that set it)."""
    root = ET.fromstring(ui_text)
    return {
        widget.get("name"): [s.text for s in prop.iter("string")]
        for widget in root.iter("widget")
        for prop in widget.findall("property")
        if prop.get("name") == property_name
    }


def ui_parameter_bindings(ui_text: str) -> dict:
    """{widget name: SlicerParameterName} for every widget that has the dynamic property."""
    return {name: values[0] for name, values in ui_widget_properties(ui_text, "SlicerParameterName").items()}


def ui_node_types(ui_text: str) -> dict:
    return ui_widget_properties(ui_text, "nodeTypes")


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


_CMAKE_SET = re.compile(r"\bset\(\s*(\w+)((?:\s+(?:\"[^\"]*\"|[^\s\")]+))*)\s*\)", re.IGNORECASE)


def _strip_cmake_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def cmake_sets(text: str) -> dict:
    """{variable: [values]} of every set() in a CMake file, with ${VAR} references expanded."""
    raw = {}
    for match in _CMAKE_SET.finditer(_strip_cmake_comments(text)):
        raw[match.group(1)] = [v.strip('"') for v in re.findall(r"\"[^\"]*\"|[^\s\"]+", match.group(2))]

    def expand(value, depth=0):
        def sub(m):
            name = m.group(1)
            if name in raw and len(raw[name]) == 1 and depth < 10:
                return expand(raw[name][0], depth + 1)
            return m.group(0)

        return re.sub(r"\$\{(\w+)\}", sub, value)

    return {name: [expand(v) for v in values] for name, values in raw.items()}


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


def untranslated_module_strings(py_source: str) -> list:
    """Module-description fields (title, helpText, acknowledgementText, categories) not wrapped in _()."""
    tree = ast.parse(py_source)
    problems = []
    module_classes = [
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(ast.unparse(b) == "ScriptedLoadableModule" for b in n.bases)
    ]
    assert module_classes, "no ScriptedLoadableModule subclass found"
    seen = set()
    for node in ast.walk(module_classes[0]):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            text = ast.unparse(target)
            if text not in ("self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText",
                            "self.parent.categories"):  # fmt: skip
                continue
            seen.add(text.rsplit(".", 1)[1])
            values = node.value.elts if isinstance(node.value, ast.List) else [node.value]
            for value in values:
                wrapped = isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("_", "translate")
                if not wrapped:
                    problems.append(f"{text} = {ast.unparse(value)[:60]}")
    for field in ("title", "helpText", "acknowledgementText", "categories"):
        if field not in seen:
            problems.append(f"self.parent.{field} is not set")
    return problems


_DISPLAY_CALLS = {"errorDisplay", "infoDisplay", "warningDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay"}


def untranslated_gui_strings(py_source: str) -> list:
    """Literal strings (plain or f-strings) shown to the user without _() outside the self-test class."""
    tree = ast.parse(py_source)
    problems = []
    for top in tree.body:
        if isinstance(top, ast.ClassDef) and top.name.endswith("Test"):
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in _DISPLAY_CALLS and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                    problems.append(ast.unparse(node)[:80])
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and target.attr in ("text", "toolTip", "windowTitle")
                        and isinstance(node.value, (ast.JoinedStr,))
                        or isinstance(target, ast.Attribute)
                        and target.attr in ("text", "toolTip", "windowTitle")
                        and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)
                        and node.value.value.strip()
                    ):
                        problems.append(ast.unparse(node)[:80])
    return problems


def png_size(path: Path):
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def schema_path() -> Path:
    candidate = ROOT.parent / "shared" / "schemas" / SCHEMA_NAME  # the checkout's sibling, as in CI
    if candidate.is_file():
        return candidate
    pytest.skip(f"{SCHEMA_NAME} (reference data outside the repository) is not available here")


def python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def listed_scripts() -> list:
    return cmake_sets(MODULE_CMAKE.read_text())["MODULE_PYTHON_SCRIPTS"]


def listed_resources() -> list:
    return cmake_sets(MODULE_CMAKE.read_text())["MODULE_PYTHON_RESOURCES"]


# --------------------------------------------------------------------------------------------------
# Module file <-> .ui


def test_every_ui_name_used_by_the_module_is_a_widget_in_the_ui_file():
    used = self_ui_names(MODULE_FILE.read_text())
    widgets = ui_widgets(UI_FILE.read_text())
    assert used, "the module uses no self.ui widgets; the parser is broken"
    assert not sorted(used - set(widgets)), "self.ui names missing from AnomalyFlag.ui"


def test_ui_name_check_catches_a_removed_widget():
    ui_text = UI_FILE.read_text().replace('name="cancelButton"', 'name="cancelButtonRenamed"')
    assert "cancelButton" in self_ui_names(MODULE_FILE.read_text()) - set(ui_widgets(ui_text))


def test_ui_has_the_sections_and_controls_the_workflow_needs():
    ui_text = UI_FILE.read_text()
    widgets = ui_widgets(ui_text)
    root = ET.fromstring(ui_text)
    sections = {
        w.find("property[@name='text']/string").text
        for w in root.iter("widget")
        if w.get("class") == "ctkCollapsibleButton"
    }
    assert {"Inputs", "Model", "Outputs", "Flagged slices", "Advanced"} <= sections
    expected = {
        "applyButton": "QPushButton",
        "cancelButton": "QPushButton",
        "progressBar": "QProgressBar",
        "logTextEdit": "QPlainTextEdit",
        "flaggedSlicesListWidget": "QListWidget",
        "modelPathLineEdit": "ctkPathLineEdit",
        "deviceComboBox": "QComboBox",
        "thresholdSpinBox": "QDoubleSpinBox",
        "batchSizeSpinBox": "QSpinBox",
        "segmentSelector": "qMRMLSegmentSelectorWidget",
    }
    assert {name: widgets.get(name) for name in expected} == expected
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_ui_declares_custom_widgets_and_passes_the_scene_to_mrml_widgets():
    ui_text = UI_FILE.read_text()
    root = ET.fromstring(ui_text)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls in ui_widgets(ui_text).values() if not cls.startswith("Q")}
    assert used <= declared, f"custom widgets used but not declared: {sorted(used - declared)}"
    top = root.find("widget").get("name")
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }  # fmt: skip
    mrml_widgets = {name for name, cls in ui_widgets(ui_text).items() if cls.startswith("qMRML") and name != top}
    assert mrml_widgets <= receivers, f"MRML widgets without the scene: {sorted(mrml_widgets - receivers)}"


# Widget class -> check that the parameter's annotation fits the connector Slicer will pick.
_CONNECTOR_TYPES = {
    "qMRMLNodeComboBox": lambda ann: ann.startswith("vtkMRML"),
    "QComboBox": lambda ann: "Choice(" in ann,
    "QDoubleSpinBox": lambda ann: re.search(r"\bfloat\b", ann) is not None,
    "QSpinBox": lambda ann: re.search(r"\bint\b", ann) is not None,
    "ctkPathLineEdit": lambda ann: "Path" in ann,
    "QLineEdit": lambda ann: re.search(r"\bstr\b", ann) is not None,
    "QCheckBox": lambda ann: re.search(r"\bbool\b", ann) is not None,
}


def binding_problems(ui_text: str, py_source: str) -> list:
    fields = parameter_node_fields(py_source)
    widgets = ui_widgets(ui_text)
    node_types = ui_node_types(ui_text)
    problems = []
    for widget, parameter in ui_parameter_bindings(ui_text).items():
        if parameter not in fields:
            problems.append(f"{widget}: SlicerParameterName '{parameter}' is not a parameter node field")
            continue
        annotation, cls = fields[parameter], widgets[widget]
        fits = _CONNECTOR_TYPES.get(cls)
        if fits is None:
            problems.append(f"{widget}: no parameter node connector for {cls}")
        elif not fits(annotation):
            problems.append(f"{widget} ({cls}) cannot show '{parameter}: {annotation}'")
        elif cls == "qMRMLNodeComboBox" and annotation not in node_types.get(widget, []):
            problems.append(f"{widget}: nodeTypes {node_types.get(widget)} do not include {annotation}")
    return problems


def test_every_slicer_parameter_name_is_a_parameter_node_field_of_a_fitting_type():
    bindings = ui_parameter_bindings(UI_FILE.read_text())
    assert len(bindings) >= 9
    assert binding_problems(UI_FILE.read_text(), MODULE_FILE.read_text()) == []


def test_binding_check_catches_an_unknown_parameter_and_a_wrong_type():
    ui_text = UI_FILE.read_text().replace("<string>batchSize</string>", "<string>batchSizes</string>")
    assert any("batchSizes" in p for p in binding_problems(ui_text, MODULE_FILE.read_text()))
    py_source = MODULE_FILE.read_text().replace("batchSize: Annotated[int,", "batchSize: Annotated[str,")
    assert any("batchSizeSpinBox" in p for p in binding_problems(UI_FILE.read_text(), py_source))


def test_parameter_node_has_the_documented_fields():
    fields = parameter_node_fields(MODULE_FILE.read_text())
    assert fields["inputVolume"] == "vtkMRMLScalarVolumeNode"
    assert fields["segmentation"] == "vtkMRMLSegmentationNode"
    assert fields["segmentId"] == "str"
    assert fields["modelPath"] == "pathlib.Path"
    assert fields["device"] == "Annotated[str, Choice(DEVICE_CHOICES)]"
    assert fields["heatmapVolume"] == "vtkMRMLScalarVolumeNode"
    assert fields["scoreTable"] == "vtkMRMLTableNode"
    assert fields["scoreChart"] == "vtkMRMLPlotChartNode"
    assert "float" in fields["thresholdOverride"] and "int" in fields["batchSize"]


# --------------------------------------------------------------------------------------------------
# What ships: CMake lists


def packaging_problems(scripts: list, resources: list, module_dir: Path = MODULE_DIR) -> list:
    problems = []
    for relative in scripts + resources:
        if not (module_dir / relative).is_file():
            problems.append(f"listed but missing: {relative}")
    expected = {p.relative_to(module_dir).as_posix() for p in python_files(module_dir)}
    for missing in sorted(expected - set(scripts)):
        problems.append(f"not listed in MODULE_PYTHON_SCRIPTS: {missing}")
    return problems


def test_cmake_lists_every_python_file_and_every_listed_file_exists():
    scripts = listed_scripts()
    assert "AnomalyFlag.py" in scripts and "AnomalyFlagDependencies.py" in scripts
    for package in PACKAGES:
        assert f"{package}/__init__.py" in scripts
    assert packaging_problems(scripts, listed_resources()) == []


def test_packaging_check_catches_an_unlisted_and_a_missing_file(tmp_path):
    module_dir = tmp_path / "AnomalyFlag"
    (module_dir / "AnomalyFlagMRML").mkdir(parents=True)
    for name in ("AnomalyFlag.py", "AnomalyFlagMRML/__init__.py", "AnomalyFlagMRML/extra.py"):
        (module_dir / name).write_text("")
    problems = packaging_problems(["AnomalyFlag.py", "AnomalyFlagMRML/__init__.py", "AnomalyFlagMRML/gone.py"], [],
                                  module_dir)  # fmt: skip
    assert problems == ["listed but missing: AnomalyFlagMRML/gone.py",
                        "not listed in MODULE_PYTHON_SCRIPTS: AnomalyFlagMRML/extra.py"]  # fmt: skip


def test_resources_the_module_loads_are_packaged():
    resources = set(listed_resources())
    tree = ast.parse(MODULE_FILE.read_text())
    used = {
        "Resources/" + node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "resourcePath"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert "Resources/UI/AnomalyFlag.ui" in used
    used.add("Resources/Icons/AnomalyFlag.png")  # found by Slicer by convention
    assert used <= resources, f"not packaged: {sorted(used - resources)}"


def test_demo_model_bundle_is_packaged_where_the_module_looks_for_it():
    sets = cmake_sets(MODULE_CMAKE.read_text())
    name = sets["MODULE_DEMO_MODEL_NAME"][0]
    tree = ast.parse(MODULE_FILE.read_text())
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert constants["DEMO_MODEL_NAME"] == name
    assert sets["MODULE_DEMO_MODEL_RELATIVE_DIR"] == [f"Resources/Models/{name}"]
    source_dir = (
        MODULE_DIR / sets["MODULE_DEMO_MODEL_SOURCE_DIR"][0].replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    ).resolve()
    assert source_dir == ROOT / "Resources" / "Models" / name
    text = _strip_cmake_comments(MODULE_CMAKE.read_text())
    install = re.search(r"install\(FILES\s+\$\{_demo_model_paths\}\s+DESTINATION\s+(\S+)", text)
    assert (
        install and install.group(1) == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${MODULE_DEMO_MODEL_RELATIVE_DIR}"
    )
    on_disk = {p.name for p in source_dir.iterdir()}
    packaged = set(sets["MODULE_DEMO_MODEL_FILES"])
    assert packaged == on_disk, f"packaged {sorted(packaged)}, in {source_dir.relative_to(ROOT)}: {sorted(on_disk)}"
    metadata = json.loads((source_dir / "metadata.json").read_text())
    weights = {entry["file"] for entry in metadata["weights"].values()}
    assert weights | {"metadata.json"} <= packaged, "the bundle has weights files that are not packaged"


def test_self_test_is_registered_when_testing_is_built():
    text = _strip_cmake_comments(MODULE_CMAKE.read_text())
    block = re.search(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", text, re.S)
    assert block and re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", block.group(1))
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME\s+\$\{MODULE_NAME\}", text)
    assert cmake_sets(MODULE_CMAKE.read_text())["MODULE_NAME"] == ["AnomalyFlag"]
    assert "class AnomalyFlagTest(ScriptedLoadableModuleTest)" in MODULE_FILE.read_text()


def test_top_level_cmake_follows_the_extension_template():
    text = _strip_cmake_comments(TOP_CMAKE.read_text())
    for pattern in (
        r"cmake_minimum_required\(VERSION [\d.]+",
        r"project\(AnomalyFlag\)",
        r"find_package\(Slicer REQUIRED\)",
        r"include\(\$\{Slicer_USE_FILE\}\)",
        r"add_subdirectory\(AnomalyFlag\)",
        r"include\(\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\)",
        r"include\(\$\{Slicer_EXTENSION_CPACK\}\)",
    ):
        assert re.search(pattern, text), pattern
    sets = cmake_sets(TOP_CMAKE.read_text())
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):  # fmt: skip
        assert sets.get(variable) and all(sets[variable]), variable
    assert sets["EXTENSION_HOMEPAGE"] == [REPOSITORY_URL]


# --------------------------------------------------------------------------------------------------
# Extensions Index entry and icons


def catalog_problems(entry: dict, top_cmake_text: str) -> list:
    import jsonschema

    schema = json.loads(schema_path().read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = [e.message for e in validator.iter_errors(entry)]
    sets = cmake_sets(top_cmake_text)
    depends = [d for d in " ".join(sets.get("EXTENSION_DEPENDS", [])).split() if d != "NA"]
    if entry.get("build_dependencies", []) != depends:
        problems.append(f"build_dependencies {entry.get('build_dependencies')} != EXTENSION_DEPENDS {depends}")
    if entry.get("category") != " ".join(sets.get("EXTENSION_CATEGORY", [])):
        problems.append("category differs from EXTENSION_CATEGORY")
    if entry.get("scm_url", "").removesuffix(".git") != REPOSITORY_URL:
        problems.append(f"scm_url {entry.get('scm_url')} is not {REPOSITORY_URL}")
    return problems


def test_catalog_entry_validates_and_matches_the_cmake_metadata():
    entry = json.loads(CATALOG_ENTRY.read_text())
    assert entry["build_dependencies"] == ["PyTorch"]
    assert catalog_problems(entry, TOP_CMAKE.read_text()) == []


def test_catalog_check_catches_schema_and_dependency_mismatches():
    entry = json.loads(CATALOG_ENTRY.read_text())
    assert catalog_problems({**entry, "homepage": "x"}, TOP_CMAKE.read_text())
    assert catalog_problems({**entry, "tier": 9}, TOP_CMAKE.read_text())
    assert catalog_problems({**entry, "build_dependencies": []}, TOP_CMAKE.read_text())
    no_torch = TOP_CMAKE.read_text().replace('set(EXTENSION_DEPENDS "PyTorch")', 'set(EXTENSION_DEPENDS "NA")')
    assert catalog_problems(entry, no_torch)


def test_icon_and_screenshot_urls_point_to_files_in_the_repository():
    sets = cmake_sets(TOP_CMAKE.read_text())
    urls = sets["EXTENSION_ICONURL"] + " ".join(sets["EXTENSION_SCREENSHOTURLS"]).split()
    for url in urls:
        assert url.startswith(RAW_URL_PREFIX), url
    assert sets["EXTENSION_ICONURL"] == [RAW_URL_PREFIX + "AnomalyFlag.png"]
    missing = [u for u in urls if not (ROOT / u[len(RAW_URL_PREFIX) :]).is_file()]
    assert not missing, f"files named by EXTENSION_ICONURL/SCREENSHOTURLS are not in the repository: {missing}"


@pytest.mark.parametrize("path", [ROOT / "AnomalyFlag.png", MODULE_DIR / "Resources" / "Icons" / "AnomalyFlag.png"])
def test_icons_are_128_by_128_png(path):
    assert png_size(path) == (128, 128)


def test_png_size_reads_the_header(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.image
    import numpy as np

    matplotlib.image.imsave(tmp_path / "wide.png", np.zeros((20, 64, 4)))
    assert png_size(tmp_path / "wide.png") == (64, 20)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000


# --------------------------------------------------------------------------------------------------
# Python: syntax level, import hygiene, translated strings


def _syntax_files():
    files = [MODULE_FILE, DEPENDENCIES_FILE]
    for package in PACKAGES:
        files += python_files(MODULE_DIR / package)
    return files


@pytest.mark.parametrize("path", _syntax_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_python_files_parse_as_python_3_9(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_python_3_9_check_rejects_newer_syntax():
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


IMPORT_BLOCKER = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked import of " + name)
        return None
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[2])
package = importlib.import_module(sys.argv[3])
names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "__main__")
for name in names:
    importlib.import_module(sys.argv[3] + "." + name)
print(",".join(names))
"""

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


def test_module_description_strings_are_translatable():
    assert untranslated_module_strings(MODULE_FILE.read_text()) == []


def test_gui_strings_are_translatable():
    assert untranslated_gui_strings(MODULE_FILE.read_text()) == []


def test_translation_checks_catch_bare_strings():
    source = MODULE_FILE.read_text().replace(
        'self.parent.title = _("Anomaly Flag")', 'self.parent.title = "Anomaly Flag"'
    )
    assert untranslated_module_strings(source) == ['self.parent.title = "Anomaly Flag"'.replace('"', "'")]
    snippet = textwrap.dedent(
        """
        class W:
            def f(self):
                slicer.util.errorDisplay(f"failed: {x}")
                self.ui.statusLabel.text = "Done"
                self.ui.statusLabel.text = _("Done")
        """
    )
    assert len(untranslated_gui_strings(snippet)) == 2


# --------------------------------------------------------------------------------------------------
# The module file loaded with stand-ins for Slicer's Qt side, torch and MONAI blocked

FAKE_SLICER = r"""
import importlib, importlib.abc, json, pathlib, sys, types

BLOCKED = {"torch", "monai", "safetensors", "SimpleITK", "AnomalyFlagLib", "AnomalyFlagMRML"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked import of " + name)
        return None

sys.meta_path.insert(0, Blocker())

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

slicer = auto_module("slicer")
slicer.__path__ = []
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
util = types.ModuleType("slicer.util")
class VTKObservationMixin:
    def __init__(self):
        pass
util.VTKObservationMixin = VTKObservationMixin
i18n = types.ModuleType("slicer.i18n")
i18n.tr = lambda text: Translated(text)
i18n.translate = lambda context, text: Translated(text)
slicer.util, slicer.i18n = util, i18n
sys.modules.update({"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw,
                    "slicer.util": util, "slicer.i18n": i18n, "qt": auto_module("qt"), "ctk": auto_module("ctk"),
                    "vtk": auto_module("vtk")})

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
    "missing": module.AnomalyFlagDependencies.missingDependencies(),
    "candidates": [str(p) for p in logic.demoModelCandidates()],
    "default": None if default is None else str(default),
    "resolveEmpty": resolveEmpty,
    "resolveGiven": str(logic.resolveModelPath("/data/models/liver")),
    "parameterFields": sorted(module.AnomalyFlagParameterNode.__annotations__),
}))
"""


def _load_module_with_fakes(module_dir: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", FAKE_SLICER, str(module_dir)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _copy_module(target: Path) -> Path:
    target.mkdir(parents=True)
    for path in (MODULE_FILE, DEPENDENCIES_FILE):
        shutil.copy(path, target / path.name)
    return target


def _fake_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    return folder


def test_module_loads_without_torch_and_marks_its_description_for_translation():
    report = _load_module_with_fakes(MODULE_DIR)
    assert report["heavyLoaded"] == []
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


# --------------------------------------------------------------------------------------------------
# Dependency installer against a fake slicer module


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


# --------------------------------------------------------------------------------------------------
# The Logic on real MRML (slicer-core), with the same stand-ins for the Qt-side modules: the console
# path (scoreVolume) and the Widget's path (prepare on the main thread, score in the ThreadRunner,
# publish on the main thread). The Widget itself needs Qt and is only checked statically above.


class _Stub:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


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
    monkeypatch.delitem(sys.modules, "AnomalyFlag", raising=False)
    import AnomalyFlag

    yield AnomalyFlag
    sys.modules.pop("AnomalyFlag", None)


@pytest.fixture
def mrml_scene():
    from mrml_support import scene_fixture

    yield from scene_fixture()


@pytest.fixture
def stent_volume(mrml_scene, tmp_path):
    from AnomalyFlagLib.phantom import make_phantom
    from mrml_support import load_volume

    phantom = make_phantom(num_slices=24, size=64, seed=5, anomalies=["metal_stent"])
    paths = phantom.save(tmp_path, "stent")
    return phantom, load_volume(mrml_scene, paths["image"], "stent")


def _composites(scene):
    from mrml_support import nodes_of_class

    return nodes_of_class(scene, "vtkMRMLSliceCompositeNode")


def test_logic_scores_a_volume_node_like_the_self_test(module_on_mrml, mrml_scene, stent_volume, tiny_model):
    from mrml_support import ijk_to_ras

    phantom, volume = stent_volume
    logic = module_on_mrml.AnomalyFlagLogic()
    progress = []
    outputs = logic.scoreVolume(
        volume, modelPath=tiny_model, device="cpu", progress=lambda d, t: progress.append((d, t))
    )
    assert progress[-1] == (24, 24)
    heat, table, result = outputs["heatmap"], outputs["table"], outputs["result"]
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
    assert table.GetNumberOfRows() == 24 and outputs["chart"] is not None
    assert logic.flaggedSlices(table) == sorted(result.flagged_indices)
    assert heat.GetDisplayNode().GetColorNodeID()
    for composite in _composites(mrml_scene):
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetForegroundOpacity() > 0

    target = max(range(24), key=lambda k: float(result.slices["normalised"][k]))
    point = logic.jumpToFlaggedSlice(volume, heat, target)
    assert len(point) == 3

    again = logic.scoreVolume(volume, modelPath=tiny_model, device="cpu", thresholdOverride=1.0e6, heatmapNode=heat,
                              tableNode=table, chartNode=outputs["chart"])  # fmt: skip
    assert again["heatmap"] is heat and again["table"] is table
    assert logic.flaggedSlices(table) == [] and again["result"].threshold == 1.0e6


def test_logic_runs_the_widget_path_through_the_thread_runner(module_on_mrml, mrml_scene, stent_volume, tiny_model):
    from AnomalyFlagMRML.runner import ThreadRunner
    from mrml_support import segmentation_from_labels

    phantom, volume = stent_volume
    liver = (phantom.organs == 2).astype(np.uint8)
    segmentation = segmentation_from_labels(mrml_scene, liver, volume, names=["liver"])
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    logic = module_on_mrml.AnomalyFlagLogic()
    job = logic.prepareScoring(volume, modelPath=tiny_model, segmentationNode=segmentation, segmentId=segment_id,
                               device="cpu", batchSize=7)  # fmt: skip
    assert job["roiMask"].shape == phantom.image.shape and job["roiMask"].any()
    assert not any(hasattr(v, "GetID") for v in job.values()), "MRML objects must not go to the worker"

    runner = ThreadRunner()
    runner.start(module_on_mrml._computeScoresTask, **job)
    assert runner.wait(120)
    events = runner.poll()
    kinds = [e[0] for e in events]
    assert kinds[-1] == "done" and "progress" in kinds and "log" in kinds, events[-1]
    outputs = logic.publishResult(events[-1][1], volume, segmentationNode=segmentation)
    result = outputs["result"]
    assert result.roi is not None
    assert not any(result.slices["flagged"] & ~result.slices["in_roi"])
    assert outputs["table"].GetNumberOfRows() == 24

    cancelled = ThreadRunner()
    cancelled.cancel()
    cancelled.start(lambda **kw: module_on_mrml._computeScoresTask(**{**kw, "cancelRequested": lambda: True}), **job)
    assert cancelled.wait(60)
    assert [e[0] for e in cancelled.poll()][-1] == "cancelled"


def test_logic_errors_name_the_cause_and_leave_the_scene_alone(module_on_mrml, mrml_scene, stent_volume, monkeypatch,
                                                               tmp_path, tiny_model):  # fmt: skip
    from AnomalyFlagLib.errors import BundleError, DeviceError

    _, volume = stent_volume
    logic = module_on_mrml.AnomalyFlagLogic()
    deps_module = module_on_mrml.AnomalyFlagDependencies
    nodes = mrml_scene.GetNumberOfNodes()
    with monkeypatch.context() as patch:
        patch.setattr(deps_module, "missingDependencies", lambda: ["torch>=2.1"])
        with pytest.raises(deps_module.DependencyInstallError, match="torch>=2.1"):
            logic.scoreVolume(volume, modelPath=tiny_model)
    with pytest.raises(BundleError, match="nowhere"):
        logic.scoreVolume(volume, modelPath=tmp_path / "nowhere")
    with pytest.raises(DeviceError, match="tpu"):
        logic.scoreVolume(volume, modelPath=tiny_model, device="tpu")
    assert mrml_scene.GetNumberOfNodes() == nodes
