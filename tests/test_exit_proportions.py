"""Exit assignment by target proportions (budgeted batch; L2W's meta loss), on hand-worked tables."""

from __future__ import annotations

import pytest
import torch

from ponder.nn.thresholds import assign_by_proportions, assign_exits, exit_proportions, fit_thresholds


def test_assignment_matches_a_hand_worked_example():
    # K = 3, q = 0.5: P = (1/2, 1/4, 1/8) / (7/8) = (4/7, 2/7, 1/7); N = 8 -> counts 4, 2 and the rest (2).
    P = exit_proportions(0.5, 3)
    assert torch.allclose(P, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))
    conf = torch.tensor([
        # sample: 0     1     2     3     4     5     6     7
        [0.90, 0.10, 0.80, 0.20, 0.70, 0.95, 0.30, 0.60],  # exit 1 takes its top 4: samples 5, 0, 2, 4
        [0.99, 0.40, 0.98, 0.50, 0.97, 0.10, 0.45, 0.30],  # exit 2: top 2 of {1, 3, 6, 7}: samples 3, 6
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # exit 3 takes the rest: 1, 7
    ])
    assert assign_by_proportions(conf, P).tolist() == [0, 2, 0, 1, 0, 0, 1, 2]


def test_zero_count_exit_is_skipped_and_last_exit_takes_the_rest():
    P = exit_proportions(0.05, 3)  # counts for N = 6: floor(5.70) = 5, floor(0.285) = 0, rest 1
    conf = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5], [1.0] * 6, [0.0] * 6])
    assert assign_by_proportions(conf, P).tolist() == [2, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("q", [0.25, 0.75, 1.0, 1.5])
def test_agrees_with_the_threshold_protocol_on_distinct_confidences(q):
    conf = torch.rand(4, 50, generator=torch.Generator().manual_seed(3))
    P = exit_proportions(q, 4)
    expected = assign_exits(conf, fit_thresholds(conf, P))
    assert torch.equal(assign_by_proportions(conf, P), expected)
    counts = assign_by_proportions(conf, P).bincount(minlength=4)
    assert counts[:3].tolist() == [int(50 * float(p)) for p in P[:3]]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="proportions"):
        assign_by_proportions(torch.rand(3, 5), exit_proportions(0.5, 4))
