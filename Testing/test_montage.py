"""The montage of flagged slices: what it keeps while scoring, and that it shows what was scored."""

import numpy as np
import pytest
import SimpleITK as sitk
from AnomalyFlagLib.io.cases import Case
from AnomalyFlagLib.io.montage import MontageSlices, write_flagged_montage
from AnomalyFlagLib.io.scored_case import CaseFiles, ScoreOptions, score_cases
from AnomalyFlagLib.orientation import AxialFrame
from AnomalyFlagLib.scoring import Scorer


def test_keeps_the_highest_slices_only():
    kept = MontageSlices(max_slices=2)  # keeps 3 * 2 slices
    rng = np.random.default_rng(0)
    scores = rng.permutation(40).astype(float)
    scores[7] = np.nan  # a slice without a score is kept last, never first
    for k0 in range(0, 40, 8):
        image = np.arange(k0, k0 + 8, dtype=np.float32)[:, None, None] * np.ones((8, 4, 5), np.float32)
        heat = np.full((8, 4, 5), 3, np.uint8)
        kept.offer(k0, image, heat, None, scores[k0 : k0 + 8])
    assert sorted(kept.slices) == sorted(np.argsort(np.nan_to_num(scores, nan=-1))[-6:].tolist())
    for k, (score, image, heat, roi) in kept.slices.items():
        assert score == scores[k] and (image == k).all() and (heat == 3).all() and roi is None


@pytest.mark.slow
def test_montage_shows_the_scored_slices_without_reading_again(flagging_model, phantom_anomalous_dir, tmp_path,
                                                                monkeypatch):  # fmt: skip
    scorer = Scorer(flagging_model, device="cpu")
    image_path = phantom_anomalous_dir / "anomalous_000.nrrd"
    kept = MontageSlices()
    result = scorer.score(str(image_path), slice_keeper=kept)
    assert result.flagged_indices, "the flagging model flags slices of the anomalous phantom"
    frame = AxialFrame.from_geometry(result.geometry)
    image = frame.view(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))))
    heat = frame.view(result.heatmap)
    for k, (_, kept_image, kept_heat, _) in kept.slices.items():
        assert np.array_equal(kept_image, image[k]) and np.array_equal(kept_heat, heat[k])
    assert write_flagged_montage(tmp_path / "m.png", kept, result, scorer.bundle.preprocess).stat().st_size > 10_000

    import AnomalyFlagLib.io.volumes as volumes

    def no_second_read(*args, **kwargs):
        raise AssertionError("the montage read an input again")

    monkeypatch.setattr(volumes, "read_image", no_second_read)
    monkeypatch.setattr(sitk, "ReadImage", no_second_read)
    (outcome,) = score_cases(scorer, [Case("case", image_path)], tmp_path / "out", ScoreOptions(montage=True))
    assert outcome.error is None and outcome.images == [CaseFiles(tmp_path / "out", "case").montage.name]
