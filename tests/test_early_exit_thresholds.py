"""Budgeted-batch threshold search: the official semantics on hand-made softmax tables."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.budget import exit_proportions
from ponder.evaluate.thresholds import (assign_exits, budget_curve, expected_macs, fit_thresholds, p_grid,
                                        thresholds_for_macs)


@pytest.mark.parametrize("p,expected", [
    (1, [4750, 237, 11, 0, 0]),
    (15, [1638, 1229, 921, 691, 518]),
    (20, [1000] * 5),
    (39, [174, 340, 664, 1295, 2525]),
])
def test_exit_proportions_reference_vectors(p, expected):
    P = exit_proportions(p / 20, 5)
    assert [math.floor(5000 * float(v)) for v in P] == expected
    assert float(P.sum()) == pytest.approx(1.0)


def test_official_float32_proportions_differ_by_one_where_the_reference_says():
    exact = math.floor(5000 * float(exit_proportions(0.05, 6)[0]))
    official = math.floor(5000 * float(exit_proportions(0.05, 6, official_float32=True)[0]))
    assert (exact, official) == (4750, 4749)


def test_p_grid():
    g = p_grid()
    assert len(g) == 39 and g[0] == 0.05 and g[-1] == pytest.approx(1.95) and len(p_grid(40)) == 40


def test_fit_thresholds_takes_most_confident_untaken_samples():
    conf = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # exit 1
        [0.1, 0.2, 0.95, 0.3, 0.85, 0.5],  # exit 2
        [0.5] * 6,                         # exit 3 (last)
    ])
    # P = [0.5, 1/3, 1/6] -> n = [3, 2, 1]
    t = fit_thresholds(conf, torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64))
    assert t[0] == pytest.approx(0.7) and t[2] == -math.inf
    # exit 2: untaken are samples 3, 4, 5 with conf 0.3, 0.85, 0.5 -> 2nd largest = 0.5
    assert t[1] == pytest.approx(0.5)
    assert assign_exits(conf, t).tolist() == [0, 0, 0, 2, 1, 1]


def test_ties_let_more_samples_exit():
    conf = torch.tensor([[0.8, 0.8, 0.8, 0.2], [0.9, 0.9, 0.9, 0.9]])
    t = fit_thresholds(conf, torch.tensor([0.25, 0.75], dtype=torch.float64))  # n_1 = 1
    assert t[0] == pytest.approx(0.8)
    assert assign_exits(conf, t).tolist() == [0, 0, 0, 1]  # three tied samples exit, not one


def test_empty_exits_get_infinite_thresholds():
    conf = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    t = fit_thresholds(conf, torch.tensor([0.05, 0.0, 0.95], dtype=torch.float64))  # n = [0, 0, 9]
    assert t[0] == math.inf and t[1] == math.inf
    assert assign_exits(conf, t).tolist() == [2] * 10
    # fewer untaken samples than n_k: nobody exits there
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5], [0.1] * 4])
    t = fit_thresholds(conf, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))  # ties: all 4 exit at 1
    assert t[1] == math.inf and assign_exits(conf, t).tolist() == [0] * 4


def test_fit_thresholds_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(5, 200, generator=g)
    conf[1, :50] = 0.5  # plenty of ties
    for q in (0.1, 0.75, 1.0, 1.6):
        P = exit_proportions(q, 5)
        assert fit_thresholds(conf, P) == _loop_reference(conf, P)


def _loop_reference(conf, P):
    """The official procedure, written as the per-sample loop (slow, obviously right)."""
    k_exits, n = conf.shape
    taken = [0] * n
    out = []
    for k in range(k_exits - 1):
        n_k = math.floor(n * float(P[k]))
        t, count = math.inf, 0
        for i in sorted(range(n), key=lambda i: -float(conf[k, i])):
            if taken[i] == 0:
                count += 1
                if count == n_k:
                    t = float(conf[k, i])
                    break
        out.append(t)
        for i in range(n):
            taken[i] += int(float(conf[k, i]) >= t)
    return out + [-math.inf]


def test_budget_curve_and_expected_macs():
    g = torch.Generator().manual_seed(2)
    val, test = torch.rand(3, 300, generator=g), torch.rand(3, 100, generator=g)
    correct = torch.zeros(3, 100, dtype=torch.bool)
    correct[2] = True  # only the last exit is ever right
    costs = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
    pts = budget_curve(val, test, correct, costs, [0.05, 1.0, 1.95])
    macs = [p["expected_macs"] for p in pts]
    assert macs == sorted(macs) and 10 <= macs[0] < macs[-1] <= 40
    for p in pts:
        assert sum(p["exit_counts"]) == 100
        assert p["accuracy"] == pytest.approx(p["exit_counts"][2])  # % of 100 samples at the last exit
        assert p["thresholds"][-1] == "-inf"
    assert expected_macs(torch.tensor([0, 2]), costs) == 25.0


def test_target_macs_mode_meets_the_budget_on_the_calibration_split():
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(4, 500, generator=g)
    costs = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    for target in (1.5, 2.5, 3.5):
        t = thresholds_for_macs(conf, costs, target)
        got = expected_macs(assign_exits(conf, t), costs)
        assert target - 0.1 <= got <= target
    assert thresholds_for_macs(conf, costs, 0.5) == [-math.inf] * 4  # below exit 1: everyone exits there
