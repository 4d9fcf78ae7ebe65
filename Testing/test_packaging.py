"""What the extension ships: the CMake lists name every Python file and resource the module loads, the demo
model is installed where the module looks for it, the self-test is registered, the top-level CMake follows
the extension template, and the Extensions Index entry, icons and licence are right. Each check has a
negative control where that is cheap."""

import ast
import json
import re
import struct
from pathlib import Path

import pytest
from module_support import (
    MODULE_CMAKE,
    MODULE_DIR,
    MODULE_FILE,
    PACKAGES,
    ROOT,
    TOP_CMAKE,
    WEB_PACKAGE,
    cmake_sets,
    python_files,
    strip_cmake_comments,
)

CATALOG_ENTRY = ROOT / "AnomalyFlag.json"
SCHEMA_NAME = "slicer-extension-catalog-entry-schema-v1.0.2.json"
REPOSITORY_URL = "https://github.com/anomalyflag/SlicerAnomalyFlag"
RAW_URL_PREFIX = "https://raw.githubusercontent.com/anomalyflag/SlicerAnomalyFlag/main/"


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


def listed_scripts() -> list:
    return cmake_sets(MODULE_CMAKE.read_text())["MODULE_PYTHON_SCRIPTS"]


def listed_resources() -> list:
    return cmake_sets(MODULE_CMAKE.read_text())["MODULE_PYTHON_RESOURCES"]


def packaging_problems(scripts: list, resources: list, module_dir: Path = MODULE_DIR) -> list:
    problems = []
    for relative in scripts + resources:
        if not (module_dir / relative).is_file():
            problems.append(f"listed but missing: {relative}")
    expected = {p.relative_to(module_dir).as_posix() for p in python_files(module_dir)
                if p.relative_to(module_dir).parts[0] != WEB_PACKAGE}  # fmt: skip
    for missing in sorted(expected - set(scripts)):
        problems.append(f"not listed in MODULE_PYTHON_SCRIPTS: {missing}")
    return problems


def test_cmake_lists_every_python_file_and_every_listed_file_exists():
    scripts = listed_scripts()
    assert "AnomalyFlag.py" in scripts and "AnomalyFlagDependencies.py" in scripts
    for package in PACKAGES:
        assert f"{package}/__init__.py" in scripts
    assert not [s for s in scripts if s.startswith(f"{WEB_PACKAGE}/")]  # the browser app is not Slicer's
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
    text = strip_cmake_comments(MODULE_CMAKE.read_text())
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
    text = strip_cmake_comments(MODULE_CMAKE.read_text())
    block = re.search(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", text, re.S)
    assert block and re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", block.group(1))
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME\s+\$\{MODULE_NAME\}", text)
    assert cmake_sets(MODULE_CMAKE.read_text())["MODULE_NAME"] == ["AnomalyFlag"]
    assert "class AnomalyFlagTest(ScriptedLoadableModuleTest)" in MODULE_FILE.read_text()


def test_top_level_cmake_follows_the_extension_template():
    text = strip_cmake_comments(TOP_CMAKE.read_text())
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
