"""Active learning: the worklist of unlabelled scans and the training datalist of recontoured cases,
on phantom cases scored with the tiny model, through the `anomalyflag` command."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.cli import main
from AnomalyFlagLib.errors import InputError
from AnomalyFlagLib.geometry import Geometry
from AnomalyFlagLib.phantom import ORGAN_LABELS
from AnomalyFlagLib.review.active_learning import (
    WORKLIST_COLUMNS,
    export_training_datalist,
    rank_cases,
    read_worklist,
    worklist_csv,
)
from AnomalyFlagLib.review.label_versions import write_new_version
from AnomalyFlagLib.review.session import ReviewSession, slice_change
from review_support import make_case_outputs


def test_worklist_ranking_and_tie_breaks(tmp_path):
    make_case_outputs(tmp_path, "b", flagged=(1, 2), score_offset=2.0)  # highest score
    make_case_outputs(tmp_path, "a", flagged=(1, 2), score_offset=0.5)  # max 4.0, 2 flagged
    make_case_outputs(tmp_path, "c", flagged=(1, 2, 3))  # max 4.0, 3 flagged
    make_case_outputs(tmp_path, "m2", flagged=(1, 2), fraction_offset=0.1)  # max 3.5, larger share
    make_case_outputs(tmp_path, "m3", flagged=(1, 2))  # same as m1: by name
    make_case_outputs(tmp_path, "m1", flagged=(1, 2))
    make_case_outputs(tmp_path, "quiet", flagged=())
    rows = rank_cases(tmp_path)
    assert [r["case"] for r in rows] == ["b", "c", "a", "m2", "m1", "m3", "quiet"]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert rows[0]["max_normalised_score"] == pytest.approx(5.5)
    assert rows[1]["flagged_slices"] == 3 and rows[-1]["flagged_slices"] == 0
    assert rows[-1]["mean_anomaly_fraction"] == 0.0
    assert rows[3]["mean_anomaly_fraction"] == pytest.approx(rows[4]["mean_anomaly_fraction"] + 0.1)
    assert worklist_csv(rows) == worklist_csv(rank_cases(tmp_path))  # the same every time
    assert worklist_csv(rows).splitlines()[0] == ",".join(WORKLIST_COLUMNS)
    assert [r["case"] for r in rank_cases(tmp_path, cases=["quiet", "a"])] == ["a", "quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no scored cases"):
        rank_cases(empty)


# ---------------------------------------------------------------------------------------------------
# On phantom cases with the tiny model


@pytest.fixture(scope="module")
def scored(flagging_model, phantom_anomalous_dir, tmp_path_factory):
    """Two anomalous and one normal phantom scored through `anomalyflag worklist`."""
    scans = tmp_path_factory.mktemp("scans")
    for f in phantom_anomalous_dir.iterdir():
        shutil.copy(f, scans / f.name)
    from AnomalyFlagLib.phantom import make_phantom_set

    make_phantom_set(scans, num_cases=1, anomalous=False, seed=9, num_slices=24, size=64)
    out = tmp_path_factory.mktemp("outputs")
    model = str(flagging_model)
    rc = main(["worklist", "--model", model, "--input", str(scans), "--output", str(out), "--device", "cpu"])
    assert rc == 0
    return scans, out


def test_worklist_command_scores_and_ranks(scored, tmp_path):
    scans, out = scored
    rows = read_worklist(out / "worklist.csv")
    assert [r["case"] for r in rows] and len(rows) == 3
    assert sorted(r["case"] for r in rows) == ["anomalous_000", "anomalous_001", "normal_000"]
    summaries = {r["case"]: json.loads((out / f"{r['case']}_summary.json").read_text()) for r in rows}
    for r in rows:
        assert Path(r["case_path"]).is_absolute() and Path(r["case_path"]) == (scans / f"{r['case']}.nrrd").resolve()
        assert float(r["max_normalised_score"]) == pytest.approx(summaries[r["case"]]["max_normalised_score"], 1e-5)
        assert int(r["flagged_slices"]) == summaries[r["case"]]["num_flagged"]
        assert (out / f"{r['case']}_heatmap.nrrd").is_file() and (out / f"{r['case']}_slices.csv").is_file()
    keys = [(-float(r["max_normalised_score"]), -int(r["flagged_slices"]), -float(r["mean_anomaly_fraction"]),
             r["case"]) for r in rows]  # fmt: skip
    assert keys == sorted(keys) and [int(r["rank"]) for r in rows] == [1, 2, 3]

    # ranking existing scores: the same list, nothing rescored, paths from the worklist or --images
    again = tmp_path / "ranked"
    assert main(["worklist", "--scores", str(out), "--output", str(again)]) == 0
    assert [p.name for p in again.iterdir()] == ["worklist.csv"]
    assert read_worklist(again / "worklist.csv") == rows
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in out.glob("*_s*"):  # summaries and slice tables only: no worklist, no sidecars
        shutil.copy(f, bare / f.name)
    assert main(["worklist", "--scores", str(bare), "--output", str(bare)]) == 0
    assert read_worklist(bare / "worklist.csv") == rows, "the summaries record each scan's path"
    for f in bare.glob("*_summary.json"):  # outputs that do not record the scan's path
        summary = json.loads(f.read_text())
        del summary["image"]
        f.write_text(json.dumps(summary))
    (bare / "worklist.csv").unlink()
    assert main(["worklist", "--scores", str(bare), "--output", str(bare)]) == 0
    assert {r["case_path"] for r in read_worklist(bare / "worklist.csv")} == {""}
    assert main(["worklist", "--scores", str(bare), "--images", str(scans), "--output", str(bare)]) == 0
    assert read_worklist(bare / "worklist.csv") == rows


def test_worklist_command_usage_errors(scored, tmp_path, capsys):
    scans, out = scored
    assert main(["worklist", "--scores", str(out), "--model", "x", "--output", str(tmp_path)]) == 2
    assert "either --scores" in capsys.readouterr().err
    assert main(["worklist", "--output", str(tmp_path)]) == 2
    assert "--model and --input" in capsys.readouterr().err
    assert main(["worklist", "--scores", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "worklist.csv").exists()


def _liver(scans, case):
    organs = sitk.ReadImage(str(scans / f"{case}_organs.nrrd"))
    return organs, (sitk.GetArrayFromImage(organs) == ORGAN_LABELS["liver"]).astype(np.uint8)


def _save_version(out, case, array, like):
    def write(tmp):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(like)
        sitk.WriteImage(image, str(tmp), True)

    return write_new_version(out, case, write)


def test_review_then_export_training(scored, tmp_path):
    """score -> worklist -> review the top case (recontour a slice, save two label versions) ->
    export-training: a MONAI datalist pointing at the image and the newest edited label."""
    scans, out = scored
    rows = read_worklist(out / "worklist.csv")
    top, second = rows[0], rows[1]
    case = top["case"]
    organs, original = _liver(scans, case)
    geometry = Geometry.from_image(organs)
    with ReviewSession.open(out, case, "Dr Ann", image_path=top["case_path"]) as session:
        reviewed, total = session.progress()
        assert reviewed == 0 and total == int(top["flagged_slices"]) >= 1
        k = session.next_pending()["slice"]
        edited = original.copy()
        edited[k, : edited.shape[1] // 2] = 0  # erase the anterior half of slice k
        edited[k, 30:34, 30:34] = 1
        v1 = _save_version(out, case, edited, organs)
        edited[k, 34:36, 30:34] = 1
        v2 = _save_version(out, case, edited, organs)
        change = slice_change(original, edited, k, geometry)
        assert change["changed_voxels"] > 0
        session.decide(k, "recontoured", note="liver dome", change=change, label_path=v2)
        while (item := session.next_pending()) is not None:
            session.decide(item["slice"], "accepted")
        decisions = len(session.decisions)
    with ReviewSession.open(out, second["case"], "Dr Bob", image_path=second["case_path"]) as session:
        while (item := session.next_pending()) is not None:
            session.decide(item["slice"], "accepted")  # nothing to learn from this case

    datalist_path = tmp_path / "train" / "datalist.json"
    assert main(["export-training", "--input", str(out), "--output", str(datalist_path)]) == 0
    datalist = json.loads(datalist_path.read_text())
    assert len(datalist["training"]) == 1
    entry = datalist["training"][0]
    assert not Path(entry["image"]).is_absolute() and not Path(entry["label"]).is_absolute()
    assert (datalist_path.parent / entry["image"]).resolve() == Path(top["case_path"])
    assert (datalist_path.parent / entry["label"]).resolve() == v2.resolve() != v1.resolve()
    assert entry["case"] == case and entry["recontoured_slices"] == [k] and entry["reviewers"] == ["Dr Ann"]
    meta = datalist["metadata"]
    summary = json.loads((out / f"{case}_summary.json").read_text())
    assert meta["model_fingerprint"] == summary["model_fingerprint"] == entry["model_fingerprint"]
    assert meta["reviewers"] == ["Dr Ann"] and meta["decisions"] == decisions and meta["recontoured_slices"] == 1
    assert meta["cases_reviewed"] == 2 and meta["cases_exported"] == 1 and meta["skipped"] == []

    # readable as a MONAI datalist and as an AnomalyFlag training input
    from AnomalyFlagLib.io.cases import discover_cases
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(str(datalist_path), is_segmentation=True, data_list_key="training")
    assert Path(items[0]["image"]).resolve() == Path(top["case_path"]) and Path(items[0]["label"]).exists()
    cases = discover_cases(datalist_path)
    assert cases[0].image == Path(top["case_path"]) and cases[0].mask == v2.resolve()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].mask))), edited)


def test_export_needs_the_image_and_an_edited_label(scored, tmp_path, capsys):
    scans, out = scored
    case = "normal_000"
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for suffix in ("_summary.json", "_slices.csv"):
        shutil.copy(out / f"{case}{suffix}", outputs / f"{case}{suffix}")
    summary = json.loads((outputs / f"{case}_summary.json").read_text())
    del summary["image"]  # outputs that do not record the scan's path
    (outputs / f"{case}_summary.json").write_text(json.dumps(summary))
    organs, original = _liver(scans, case)
    with ReviewSession.open(outputs, case, "Dr Cy") as session:  # image path not recorded
        k = session.next_pending()["slice"]
        session.decide(k, "recontoured", note="no label saved yet")
    datalist = tmp_path / "datalist.json"
    with pytest.raises(InputError, match="no edited segmentation version"):
        export_training_datalist(outputs, datalist)
    _save_version(outputs, case, original, organs)
    assert main(["export-training", "--input", str(outputs), "--output", str(datalist)]) == 2
    assert "pass --images" in capsys.readouterr().err and not datalist.exists()
    assert main(["export-training", "--input", str(outputs), "--images", str(scans), "--output", str(datalist)]) == 0
    entry = json.loads(datalist.read_text())["training"][0]
    assert (datalist.parent / entry["image"]).resolve() == (scans / f"{case}.nrrd").resolve()
    assert entry["label"] == f"outputs/{case}_seg_v1.seg.nrrd"
