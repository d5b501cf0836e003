"""L2W's weight prediction network: weights average to 1 along the normalised axis, structure, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ponder.nn.wpn import WeightPredictionNetwork, normalise_weights

AXES = {"col": 1, "row": 0, "mat": None}


def _v(seed: int = 0) -> torch.Tensor:
    return torch.rand(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_hand_worked_weights():
    v = torch.tensor([[0.5, -0.5, 0.0], [0.2, 0.2, 0.8]], dtype=torch.float64)
    # col: the mean of each row (0, 0.4) is subtracted; w = 1 + 0.8 (v - mean)
    assert torch.allclose(normalise_weights(v, 0.8, "col"),
                          torch.tensor([[1.4, 0.6, 1.0], [0.84, 0.84, 1.32]], dtype=torch.float64))
    # row: column means (0.35, -0.15, 0.4); mat: the mean of everything (0.2)
    assert torch.allclose(normalise_weights(v, 0.5, "row"),
                          torch.tensor([[1.075, 0.825, 0.8], [0.925, 1.175, 1.2]], dtype=torch.float64))
    assert torch.allclose(normalise_weights(v, 0.5, "mat"),
                          torch.tensor([[1.15, 0.65, 0.9], [1.0, 1.0, 1.3]], dtype=torch.float64))


@pytest.mark.parametrize("normalisation", sorted(AXES))
def test_weights_average_to_one_along_the_normalised_axis(normalisation):
    v, delta = _v(), 0.8
    w = normalise_weights(v, delta, normalisation)
    axis = AXES[normalisation]
    mean = w.mean() if axis is None else w.mean(dim=axis)
    assert torch.allclose(mean, torch.ones_like(mean))
    assert w.min() >= 1 - 2 * delta and w.max() <= 1 + 2 * delta
    for other in {0, 1} - ({axis} if axis is not None else set()):  # the other axes are not normalised
        assert not torch.allclose(w.mean(dim=other), torch.ones(w.shape[1 - other], dtype=w.dtype))


@pytest.mark.parametrize("normalisation", sorted(AXES))
def test_wpn_weights_average_to_one_and_never_reach_the_backbone(normalisation):
    torch.manual_seed(0)
    wpn = WeightPredictionNetwork(4, width=16, normalisation=normalisation, delta=0.3)
    losses = torch.rand(8, 4, requires_grad=True)
    w = wpn(losses)
    axis = AXES[normalisation]
    mean = w.mean() if axis is None else w.mean(dim=axis)
    assert torch.allclose(mean, torch.ones_like(mean), atol=1e-6)
    (w * losses).sum().backward()
    assert all(p.grad is not None for p in wpn.parameters())
    assert torch.equal(losses.grad, w.detach())  # only the explicit product: no path through the WPN input


def test_structure_depth_width_inputs():
    wpn = WeightPredictionNetwork(5)  # paper defaults: one hidden layer of 500, loss input
    linears = [m for m in wpn.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 500), (500, 5)]
    assert isinstance(wpn.mlp[-1], nn.Tanh) and isinstance(wpn.mlp[1], nn.ReLU)
    deep = WeightPredictionNetwork(3, depth=3, width=7, inputs="both")
    assert [(m.in_features, m.out_features) for m in deep.mlp if isinstance(m, nn.Linear)] == [
        (6, 7), (7, 7), (7, 7), (7, 3)]
    assert len([m for m in WeightPredictionNetwork(3, depth=0).mlp if isinstance(m, nn.Linear)]) == 1


def test_confidence_inputs_and_delta_zero():
    torch.manual_seed(1)
    losses, conf = torch.rand(5, 3), torch.rand(5, 3)
    wpn = WeightPredictionNetwork(3, width=8, inputs="conf")
    assert torch.equal(wpn(losses, conf), wpn(losses * 7, conf))  # reads only the confidences
    assert not torch.equal(wpn(losses, conf), wpn(losses, conf * 0.5))
    both = WeightPredictionNetwork(3, width=8, inputs="both")
    assert both(losses, conf).shape == (5, 3)
    assert torch.equal(WeightPredictionNetwork(3, width=8, delta=0.0)(losses), torch.ones(5, 3))


def test_option_errors():
    with pytest.raises(ValueError, match="inputs must be one of loss, conf, both"):
        WeightPredictionNetwork(3, inputs="logits")
    with pytest.raises(ValueError, match="normalisation must be one of col, row, mat"):
        WeightPredictionNetwork(3, normalisation="column")
    with pytest.raises(ValueError, match="needs the exit confidences"):
        WeightPredictionNetwork(3, inputs="conf")(torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"per-exit losses \[B, 3\]"):
        WeightPredictionNetwork(3)(torch.rand(2, 4))
