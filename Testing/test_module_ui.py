"""The module panel without the Slicer application: every widget the panel binds is in the .ui with a fitting
parameter node field, the user-visible strings are translatable, the panel calls only what the Logic and its
controllers have, and the Review section (with stand-ins for its Qt widgets, on real MRML) connects its
buttons and keys, drives a review and hands a slice over to the Segment Editor. Parser checks have a
negative control."""

import ast
import re
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from contextlib import contextmanager

import numpy as np
import pytest
from module_support import (  # noqa: F401 - module_on_mrml and mrml_scene are fixtures
    GUI_FILES,
    MODULE_FILE,
    REVIEW_SECTION_FILE,
    UI_FILE,
    class_def,
    method_def,
    module_on_mrml,
    mrml_scene,
    parameter_node_fields,
    self_ui_names,
    ui_widgets,
)


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


@pytest.mark.parametrize("path", GUI_FILES, ids=lambda p: p.name)
def test_every_ui_name_used_by_the_panel_is_a_widget_in_the_ui_file(path):
    used = self_ui_names(path.read_text())
    widgets = ui_widgets(UI_FILE.read_text())
    assert used, f"{path.name} uses no self.ui widgets; the parser is broken"
    assert not sorted(used - set(widgets)), f"self.ui names of {path.name} missing from AnomalyFlag.ui"


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


def test_module_description_strings_are_translatable():
    assert untranslated_module_strings(MODULE_FILE.read_text()) == []


@pytest.mark.parametrize("path", GUI_FILES, ids=lambda p: p.name)
def test_gui_strings_are_translatable(path):
    assert untranslated_gui_strings(path.read_text()) == []


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
# The Review section: its widgets in the .ui, and the calls of the panel to the Logic and its controllers


REVIEW_WIDGETS = {
    "reviewerLineEdit": "QLineEdit",
    "worklistPathLineEdit": "ctkPathLineEdit",
    "loadWorklistButton": "QPushButton",
    "previousCaseButton": "QPushButton",
    "nextCaseButton": "QPushButton",
    "reviewCaseLabel": "QLabel",
    "reviewProgressLabel": "QLabel",
    "reviewSlicesListWidget": "QListWidget",
    "acceptSliceButton": "QPushButton",
    "recontourSliceButton": "QPushButton",
    "finishRecontourButton": "QPushButton",
    "skipSliceButton": "QPushButton",
    "abnormalSliceButton": "QPushButton",
    "undoDecisionButton": "QPushButton",
    "reviewNoteLineEdit": "QLineEdit",
    "decisionsTableView": "qMRMLTableView",
}
BUTTON_SLOTS = {
    "loadWorklistButton": "onLoadWorklist",
    "previousCaseButton": "onPreviousCase",
    "nextCaseButton": "onNextCase",
    "acceptSliceButton": "onAcceptSlice",
    "recontourSliceButton": "onRecontourSlice",
    "finishRecontourButton": "onFinishRecontour",
    "skipSliceButton": "onSkipSlice",
    "abnormalSliceButton": "onAbnormalSlice",
    "undoDecisionButton": "onUndoDecision",
}
PANEL_BUTTON_SLOTS = {
    "useDemoModelButton": "onUseDemoModel",
    "installDependenciesButton": "onInstallDependencies",
    "applyButton": "onApplyButton",
    "cancelButton": "onCancelButton",
    "previousFlaggedButton": "onPreviousFlagged",
    "nextFlaggedButton": "onNextFlagged",
}
SHORTCUTS = {"A": "onAcceptSlice", "R": "onRecontourSlice", "S": "onSkipSlice", "X": "onAbnormalSlice"}


def review_section_widgets(ui_text):
    """{name: class} of the widgets inside the 'Review' collapsible section."""
    root = ET.fromstring(ui_text)
    for widget in root.iter("widget"):
        if (
            widget.get("class") == "ctkCollapsibleButton"
            and widget.findtext("property[@name='text']/string") == "Review"
        ):
            return {w.get("name"): w.get("class") for w in widget.iter("widget") if w is not widget}
    return {}


def connected_buttons(py_source, class_name="AnomalyFlagWidget", method="setup"):
    """{ui name: slot} of `self.ui.<name>.connect("clicked(bool)", self.<slot>)` in a method of a class."""
    body = method_def(class_def(ast.parse(py_source), class_name), method)
    out = {}
    for node in ast.walk(body):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and ast.unparse(owner).startswith("self.ui.") and len(node.args) == 2:
                if isinstance(node.args[1], ast.Attribute):
                    out[owner.attr] = (node.args[0].value, node.args[1].attr)
    return {name: slot for name, (signal, slot) in out.items() if signal == "clicked(bool)"}


def calls_missing(py_source, class_name, owner, target):
    """`<owner>.<name>` used in a class of `py_source` that the object `target` does not have."""
    used = {
        n.attr
        for n in ast.walk(class_def(ast.parse(py_source), class_name))
        if isinstance(n, ast.Attribute) and ast.unparse(n.value) == owner
    }
    return sorted(name for name in used if not hasattr(target, name))


def test_review_section_has_its_widgets():
    ui_text = UI_FILE.read_text()
    section = review_section_widgets(ui_text)
    assert {name: section.get(name) for name in REVIEW_WIDGETS} == REVIEW_WIDGETS
    assert (
        review_section_widgets(ui_text.replace('name="skipSliceButton"', 'name="skip"')).get("skipSliceButton") is None
    )
    texts = {w.get("name"): w.findtext("property[@name='text']/string") for w in ET.fromstring(ui_text).iter("widget")}
    for key, slot in SHORTCUTS.items():
        button = next(b for b, s in BUTTON_SLOTS.items() if s == slot)
        assert f"({key})" in texts[button], "the button names its shortcut"
    fields = parameter_node_fields(MODULE_FILE.read_text())
    assert fields["reviewer"] == "str" and fields["worklistFolder"] == "pathlib.Path"
    assert set(REVIEW_WIDGETS) <= set(ui_widgets(ui_text))


def test_panel_buttons_are_connected_to_widget_methods():
    source = MODULE_FILE.read_text()
    connected = connected_buttons(source)
    assert {b: connected.get(b) for b in PANEL_BUTTON_SLOTS} == PANEL_BUTTON_SLOTS
    widget = class_def(ast.parse(source), "AnomalyFlagWidget")
    methods = {n.name for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert set(PANEL_BUTTON_SLOTS.values()) | {"onFlaggedSliceSelected", "onPollRunner"} <= methods
    broken = source.replace('self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)', "")
    assert "applyButton" not in connected_buttons(broken)
    review = connected_buttons(REVIEW_SECTION_FILE.read_text(), "ReviewSection", "__init__")
    assert {b: review.get(b) for b in BUTTON_SLOTS} == BUTTON_SLOTS


def test_every_call_of_the_panel_to_the_logic_and_its_controllers_exists(module_on_mrml):  # noqa: F811
    logic = module_on_mrml.AnomalyFlagLogic()
    source, section = MODULE_FILE.read_text(), REVIEW_SECTION_FILE.read_text()
    assert calls_missing(source, "AnomalyFlagWidget", "self.logic", logic) == []
    assert calls_missing(source, "AnomalyFlagWidget", "self.logic.review", logic.review) == []
    assert calls_missing(source, "AnomalyFlagWidget", "self.logic.scoring", logic.scoring) == []
    assert calls_missing(section, "ReviewSection", "self.review", logic.review) == []
    broken = section.replace("self.review.acceptSlice", "self.review.acceptSlices")
    assert calls_missing(broken, "ReviewSection", "self.review", logic.review) == ["acceptSlices"]


def test_review_controller_methods_are_documented_and_gui_free():
    from AnomalyFlagMRML import reviewController

    source = open(reviewController.__file__).read()
    controller = class_def(ast.parse(source), "ReviewController")
    for name in ("openReview", "reviewQueue", "reviewProgressText", "acceptSlice", "skipSlice", "startRecontour",
                 "finishRecontour", "closeReview", "loadWorklist", "nextCase", "previousCase"):  # fmt: skip
        method = method_def(controller, name)
        assert ast.get_docstring(method), f"{name} has no docstring"
        used = {ast.unparse(n) for n in ast.walk(method) if isinstance(n, ast.Attribute)}
        assert not any(u.startswith(("qt.", "ctk.", "self.ui", "slicer.util.selectModule")) for u in used), name


# --------------------------------------------------------------------------------------------------
# The Review section with stand-ins for its Qt widgets, on a real ReviewController and MRML scene


class FakeWidget:
    """A panel widget: the slots connected to it, the properties set on it, and a list widget's rows."""

    def __init__(self, name):
        self.name, self.connections, self.rows, self.currentRow = name, {}, [], -1
        self.text, self.enabled, self.blocked, self.tableNode = "", True, False, None

    def connect(self, signal, slot):
        self.connections[signal] = slot

    def blockSignals(self, blocked):
        self.blocked = blocked

    def clear(self):
        self.rows, self.currentRow = [], -1

    def addItem(self, item):
        self.rows.append(item)

    @property
    def count(self):
        return len(self.rows)

    def item(self, row):
        return self.rows[row] if 0 <= row < len(self.rows) else None

    def currentItem(self):
        return self.item(self.currentRow)

    def setCurrentItem(self, item):
        self.currentRow = self.rows.index(item)

    def setCurrentRow(self, row):
        self.currentRow = row
        if not self.blocked and "currentRowChanged(int)" in self.connections:
            self.connections["currentRowChanged(int)"](row)

    def setMRMLTableNode(self, node):
        self.tableNode = node


class FakeUi:
    def __init__(self):
        self.widgets = {}

    def __getattr__(self, name):
        return self.widgets.setdefault(name, FakeWidget(name))


class FakeShortcut:
    def __init__(self, keys, parent):
        self.keys, self.parent, self.slots = keys, parent, {}

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def disconnect(self, signal):
        self.slots.pop(signal, None)

    def setParent(self, parent):
        self.parent = parent


class FakeListItem:
    def __init__(self, text):
        self.text, self.values = text, {}

    def setData(self, role, value):
        self.values[role] = value

    def data(self, role):
        return self.values.get(role)


@pytest.fixture
def review_section(module_on_mrml, monkeypatch):  # noqa: F811
    """AnomalyFlagWidgets.reviewSection imported with a qt stand-in that knows shortcuts and list rows, and
    error dialogs recorded in `.errors` instead of shown."""
    import slicer.util

    qt = types.ModuleType("qt")
    qt.QShortcut, qt.QListWidgetItem = FakeShortcut, FakeListItem
    qt.QKeySequence = lambda key: key
    qt.Qt = types.SimpleNamespace(UserRole=32)
    monkeypatch.setitem(sys.modules, "qt", qt)
    for name in [m for m in sys.modules if m.startswith("AnomalyFlagWidgets")]:
        monkeypatch.delitem(sys.modules, name)
    import AnomalyFlagWidgets.reviewSection as module

    errors = []

    @contextmanager
    def recordErrors(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # the application shows a dialog and goes on
            errors.append((message, exc))

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", recordErrors, raising=False)
    module.errors = errors
    yield module
    for name in [m for m in sys.modules if m.startswith("AnomalyFlagWidgets")]:
        sys.modules.pop(name)


def _scored_case_with_volume(scene, folder):
    """Synthetic scoring outputs of case1 (flagged 3, 7, 8, 15, 20, 31 of 40) and a volume on its grid."""
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray
    from review_support import make_case_outputs

    out = make_case_outputs(folder)
    from AnomalyFlagLib.geometry import Geometry

    geometry = Geometry((16, 16, 40), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case1")
    updateVolumeNodeFromArray(volume, np.arange(40 * 16 * 16, dtype=np.int16).reshape(40, 16, 16), geometry)
    return out, volume


def test_review_section_connects_its_buttons_and_keys_and_drives_a_review(review_section, mrml_scene, tmp_path):  # noqa: F811
    from AnomalyFlagMRML.reviewController import ReviewController
    from AnomalyFlagWidgets.sliceList import sliceOfItem

    out, volume = _scored_case_with_volume(mrml_scene, tmp_path / "out")
    controller, ui, statuses = ReviewController(), FakeUi(), []
    section = review_section.ReviewSection(ui, controller, lambda: None, statuses.append, "panel")
    assert {b: ui.widgets[b].connections.get("clicked(bool)") for b in BUTTON_SLOTS} == {
        b: getattr(section, slot) for b, slot in BUTTON_SLOTS.items()
    }
    assert {s.keys: s.slots["activated()"] for s in section._shortcuts} == {
        key: getattr(section, slot) for key, slot in SHORTCUTS.items()
    }
    assert all(s.parent == "panel" for s in section._shortcuts)
    assert ui.reviewSlicesListWidget.connections["currentRowChanged(int)"] == section.onReviewSliceSelected
    assert ui.reviewCaseLabel.text == "No case loaded." and ui.reviewProgressLabel.text == "No review open."
    assert not ui.acceptSliceButton.enabled and not ui.undoDecisionButton.enabled

    controller.openReview(out, "case1", "Dr Ann", volumeNode=volume)
    section.updateGui()
    listWidget = ui.reviewSlicesListWidget
    queue = controller.reviewQueue()
    assert [sliceOfItem(row) for row in listWidget.rows] == [q["slice"] for q in queue]
    assert [row.text for row in listWidget.rows] == [controller.queueItemText(q) for q in queue]
    assert ui.reviewProgressLabel.text == "0 of 6 reviewed" and ui.decisionsTableView.tableNode is not None
    assert not ui.acceptSliceButton.enabled  # nothing selected yet

    section._selectNextPending()  # as after loading a case: the first pending slice, views centred on it
    first = queue[0]["slice"]
    assert sliceOfItem(listWidget.currentItem()) == first and ui.acceptSliceButton.enabled
    assert not ui.recontourSliceButton.enabled  # no segmentation in this review
    ui.reviewNoteLineEdit.text = "contour fine"
    section.onAcceptSlice()
    assert (
        controller.reviewQueue()[0]["decision"] == "accepted" and controller.reviewQueue()[0]["note"] == "contour fine"
    )
    assert ui.reviewNoteLineEdit.text == "" and ui.reviewProgressLabel.text == "1 of 6 reviewed"
    second = sliceOfItem(listWidget.currentItem())
    assert second == queue[1]["slice"] == controller.nextPendingSlice()
    section.onSkipSlice()
    assert controller.reviewQueue()[1]["decision"] == "skipped" and ui.undoDecisionButton.enabled
    section.onUndoDecision()
    assert controller.reviewQueue()[1]["decision"] is None and sliceOfItem(listWidget.currentItem()) == second
    section.onAbnormalSlice()
    assert controller.reviewQueue()[1]["decision"] == "abnormal" and ui.abnormalSliceButton.enabled
    assert "confirmed abnormal" in listWidget.rows[1].text
    section.onUndoDecision()

    # a decision that cannot be saved is shown and records nothing
    controller.reviewSession.lock_path.unlink()
    section.onSkipSlice()
    assert review_section.errors[-1][0] == "The decision was not saved." and controller.reviewProgress() == (1, 6)

    # resumed, every slice accepted in turn: the panel says so
    controller.openReview(out, "case1", "Dr Ann", volumeNode=volume)
    section.updateGui()
    section._selectNextPending()
    for _ in range(5):
        section.onAcceptSlice()
    assert controller.reviewProgress() == (6, 6) and statuses[-1] == "All flagged slices of this case are reviewed."

    shortcuts = list(section._shortcuts)
    section.cleanup()
    assert section._shortcuts == [] and all(not s.slots and s.parent is None for s in shortcuts)
    assert controller.reviewSession is None and not (out / "case1_review.lock").exists()


def test_review_section_recontours_a_slice(review_section, mrml_scene, tmp_path, monkeypatch):  # noqa: F811
    from AnomalyFlagMRML.reviewController import ReviewController
    from AnomalyFlagWidgets.sliceList import sliceOfItem
    from mrml_support import segmentation_from_labels

    out, volume = _scored_case_with_volume(mrml_scene, tmp_path / "out")
    labels = np.zeros((40, 16, 16), np.uint8)
    labels[:, 4:12, 4:12] = 1
    segmentation = segmentation_from_labels(mrml_scene, labels, volume, names=["liver"])
    controller, ui, statuses, targets, effects = ReviewController(), FakeUi(), [], [], []
    monkeypatch.setattr(review_section, "openSegmentEditor", targets.append)
    monkeypatch.setattr(review_section, "segmentEditorWidget",
                        lambda: types.SimpleNamespace(setActiveEffect=effects.append))  # fmt: skip
    section = review_section.ReviewSection(ui, controller, lambda: None, statuses.append, "panel")
    controller.openReview(out, "case1", "Dr Ann", volumeNode=volume, segmentationNode=segmentation)
    section.updateGui()
    section._selectNextPending()
    sliceIndex = sliceOfItem(ui.reviewSlicesListWidget.currentItem())
    assert ui.recontourSliceButton.enabled and not ui.finishRecontourButton.enabled

    section.onRecontourSlice()
    assert [t["sliceIndex"] for t in targets] == [sliceIndex] and targets[0]["segmentName"] == "liver"
    assert statuses[-1].startswith(f"Recontouring slice {sliceIndex} (segment 'liver')")
    assert ui.finishRecontourButton.enabled and controller.recontouringSlices() == [sliceIndex]
    ui.reviewNoteLineEdit.text = "unchanged"
    section.onFinishRecontour()
    assert effects == [None]  # the Segment Editor's active effect was finished first
    record = controller.reviewQueue()[0]
    assert record["decision"] == "recontoured" and record["note"] == "unchanged"
    assert record["label"] == "case1_seg_v1.seg.nrrd" and (out / "case1_seg_v1.seg.nrrd").is_file()
    assert statuses[-1] == (
        f"Slice {sliceIndex} recontoured: Dice 1.000, 0 voxels changed; saved as case1_seg_v1.seg.nrrd."
    )
    assert not ui.finishRecontourButton.enabled and ui.reviewNoteLineEdit.text == ""
    section.cleanup()


def test_recontour_hands_the_target_to_the_segment_editor(review_section, mrml_scene, monkeypatch):  # noqa: F811
    import slicer
    from AnomalyFlagLib.geometry import Geometry
    from AnomalyFlagMRML.review import recontourTarget
    from AnomalyFlagMRML.volumes import updateVolumeNodeFromArray
    from mrml_support import nodes_of_class, segmentation_from_labels

    geometry = Geometry((32, 32, 12), (1.0, 1.0, 2.0), (-10.0, 5.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    updateVolumeNodeFromArray(volume, np.zeros((12, 32, 32), np.int16), geometry)
    heat = np.zeros((12, 32, 32), np.uint8)
    heat[5, 20:24, 4:8] = 200  # the hot spot of slice 5
    heatmap = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heatmap")
    updateVolumeNodeFromArray(heatmap, heat, geometry)
    labels = np.zeros((12, 32, 32), np.uint8)
    labels[3:8, 8:24, 8:24] = 1
    segmentation = segmentation_from_labels(mrml_scene, labels, volume, names=["liver"])
    segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
    target = recontourTarget(segmentation, segmentId, volume, 5, heatmap)

    calls, editorNode = [], mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")

    class FakeEditorWidget:
        def mrmlSegmentEditorNode(self):
            return editorNode

        def updateWidgetFromMRML(self):
            calls.append("updateWidgetFromMRML")

    monkeypatch.setattr(slicer.util, "selectModule", calls.append, raising=False)
    monkeypatch.setattr(review_section, "segmentEditorWidget", FakeEditorWidget)
    review_section.openSegmentEditor(target)
    assert calls == ["SegmentEditor", "updateWidgetFromMRML"]
    assert editorNode.GetSegmentationNode() is segmentation and editorNode.GetSelectedSegmentID() == segmentId
    source = (editorNode.GetSourceVolumeNode() if hasattr(editorNode, "GetSourceVolumeNode")
              else editorNode.GetMasterVolumeNode())  # fmt: skip
    assert source is volume
    for sliceNode in nodes_of_class(mrml_scene, "vtkMRMLSliceNode"):  # centred on the hot spot of slice 5
        centre = [sliceNode.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        assert np.allclose(centre, target["sliceRAS"], atol=1e-6)
    assert target["sliceRAS"] != recontourTarget(segmentation, segmentId, volume, 5)["sliceRAS"]
