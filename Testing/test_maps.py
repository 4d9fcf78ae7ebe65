"""From raw component maps to the anomaly map and slice score: normal statistics, pooling, neighbours."""

import numpy as np
import pytest
import torch
from AnomalyFlagLib.config import ScoreConfig
from AnomalyFlagLib.maps import MapScorer, MapStatisticsAccumulator, neighbour_max


def test_neighbour_max_takes_the_best_score_of_adjacent_slices_of_the_same_case():
    scores = np.array([0.0, 5.0, 0.0, 0.0, 1.0, 9.0, 0.0, 2.0])
    case = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    index = np.array([0, 1, 2, 3, 4, 0, 1, 3])  # case 1 lacks slice 2 (excluded): 1 and 3 are not neighbours
    best, source = neighbour_max(scores, case, index, 1)
    np.testing.assert_array_equal(best, [5, 5, 5, 1, 1, 9, 9, 2])
    np.testing.assert_array_equal(source, [1, 1, 1, 4, 4, 0, 0, 3])
    same, own = neighbour_max(scores, case, index, 0)
    np.testing.assert_array_equal(same, scores)
    np.testing.assert_array_equal(own, index)
    shuffled = np.random.default_rng(0).permutation(len(scores))
    best2, _ = neighbour_max(scores[shuffled], case[shuffled], index[shuffled], 1)
    np.testing.assert_array_equal(best2, best[shuffled]), "the order of the slices does not matter"


def _normal_maps(n, size, gen):
    """Normal maps: noise everywhere, and a 'hot spot' (normal anatomy that varies) always at one place."""
    m = torch.rand(n, size, size, generator=gen) * 0.1
    m[:, 4:8, 4:8] += torch.rand(n, 1, 1, generator=gen) * 2.0
    return m


def test_normal_statistics_suppress_a_normal_hot_spot_but_not_a_new_one():
    gen = torch.Generator().manual_seed(0)
    size, n = 32, 200
    pos = torch.rand(n, generator=gen)
    body = torch.ones(n, 1, size, size, dtype=torch.bool)
    acc = MapStatisticsAccumulator(["r"], bins=2, size=size)
    acc.add({"r": _normal_maps(n, size, gen)}, pos, body)
    config = ScoreConfig(pixel_floor=0.5, map_sigma_mm=0.0, score_area_mm2=4.0)
    scorer = MapScorer({"r": 1.0}, acc.finish(config.pixel_floor, sigma_px=0.0), config, pixel_mm=1.0)
    normal = _normal_maps(20, size, gen)
    lesion = normal.clone()
    lesion[:, 20:23, 20:23] += 1.0  # half the hot spot's range, but where maps never vary
    a = scorer({"r": normal}, pos[:20], body[:20])
    b = scorer({"r": lesion}, pos[:20], body[:20])
    assert float(b.score.min()) > 2 * float(a.score.max()), "the new spot outranks the normal hot spot"
    assert b.pixel_map[:, 20:23, 20:23].mean() > 5 * b.pixel_map[:, 4:8, 4:8].mean()
    assert set(b.components) == {"r"} and b.pixel_map.shape == (20, size, size)


def test_slice_score_is_the_mean_of_the_top_area():
    size = 16
    statistics = MapStatisticsAccumulator(["r"], bins=1, size=size).finish(1.0, 0.0)  # mean 0, scale = floor
    statistics.scale.fill_(1.0)
    config = ScoreConfig(map_sigma_mm=0.0, score_area_mm2=8.0)
    scorer = MapScorer({"r": 2.0}, statistics, config, pixel_mm=2.0)  # 8 mm2 = 2 pixels of 4 mm2
    maps = torch.zeros(1, size, size)
    maps[0, 0, 0], maps[0, 5, 5], maps[0, 9, 9] = 3.0, 1.0, -4.0
    body = torch.ones(1, 1, size, size, dtype=torch.bool)
    out = scorer({"r": maps}, torch.zeros(1), body)
    assert float(out.score) == pytest.approx(2.0 * (3.0 + 1.0) / 2)
    assert float(out.pixel_map.min()) == 0.0, "below-normal values do not cancel other components"
    body[0, 0, 0, 0] = False
    assert float(scorer({"r": maps}, torch.zeros(1), body).score) == pytest.approx(2.0 * (1.0 + 0.0) / 2)


def test_a_whole_slice_component_adds_to_the_score_but_not_to_the_map():
    size = 16
    statistics = MapStatisticsAccumulator(["r", "g"], bins=1, size=size, whole_slice=["g"]).finish(1.0, 0.0)
    statistics.scale.fill_(1.0)
    statistics.slice_weight.fill_(3.0)  # the calibration's ratio of the local score's spread to g's
    config = ScoreConfig(map_sigma_mm=0.0, score_area_mm2=8.0)
    scorer = MapScorer({"r": 2.0, "g": 0.5}, statistics, config, pixel_mm=2.0)
    local = torch.zeros(1, size, size)
    local[0, 0, 0] = local[0, 1, 1] = 4.0
    whole = torch.full((1, size, size), 1.0)
    whole[0, 8:, :] = 2.0
    out = scorer({"r": local, "g": whole}, torch.zeros(1), torch.ones(1, 1, size, size, dtype=torch.bool))
    assert torch.equal(out.pixel_map, 2.0 * local), "the map is the local components' alone"
    assert float(out.components["g"]) == pytest.approx(2.0)
    assert float(out.score) == pytest.approx(2.0 * 4.0 + 0.5 * 3.0 * 2.0)
