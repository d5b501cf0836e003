"""ACT halting math: the golden vectors of the reference (SACT official tests), gradients, branches."""

import pytest
import torch

from ponder.cost import count_macs
from ponder.nn.halting import (
    HALT_EPS,
    ACTAccumulator,
    HaltingBranch,
    SpatialHaltingBranch,
    act_halting,
    bn_affine,
)

# (h for units 1..4 of a 5-unit block, N, rho, halting distribution, d rho / d h)
GOLDEN = [
    ([0.999, 0.999, 0.999, 0.999], 1, 2.0, [1, 0, 0, 0, 0], [0, 0, 0, 0]),
    ([0.01, 0.50, 0.60, 0.70], 3, 3.49, [0.01, 0.50, 0.49, 0, 0], [-1, -1, 0, 0]),
    ([0.01, 0.01, 0.01, 0.01], 5, 5.96, [0.01, 0.01, 0.01, 0.01, 0.96], [-1, -1, -1, -1]),
]


@pytest.mark.parametrize("h, n, rho, dist, grad", GOLDEN)
def test_golden_halting_vectors(h, n, rho, dist, grad):
    h = torch.tensor([h], dtype=torch.float64, requires_grad=True)  # one position, 4 scores
    res = act_halting(h)
    assert res.n.item() == n
    assert res.ponder_cost.item() == pytest.approx(rho, abs=1e-9)
    assert torch.allclose(res.distribution[0], torch.tensor(dist, dtype=torch.float64), atol=1e-9)
    res.ponder_cost.sum().backward()
    assert torch.allclose(h.grad[0], torch.tensor(grad, dtype=torch.float64))


def test_golden_vectors_batched_and_as_maps():
    # all three golden rows at once, laid out as a [B=1, H=1, W=3] map of positions
    h = torch.tensor([[row[0] for row in GOLDEN]], dtype=torch.float64).reshape(1, 1, 3, 4)
    res = act_halting(h)
    assert res.n.shape == (1, 1, 3)
    assert res.n.flatten().tolist() == [1, 3, 5]
    assert torch.allclose(res.ponder_cost.flatten(), torch.tensor([2.0, 3.49, 5.96], dtype=torch.float64))
    assert torch.allclose(res.distribution.sum(-1), torch.ones(1, 1, 3, dtype=torch.float64))


def test_mean_field_output_is_distribution_weighted_sum_of_states():
    torch.manual_seed(0)
    L, B = 5, 6
    h = torch.rand(B, L - 1) * 0.6
    states = [torch.randn(B, 3, 2, 2) for _ in range(L)]
    acc = ACTAccumulator(L, (B,), torch.device("cpu"))
    for l, x in enumerate(states):
        acc.step(x, h[:, l] if l < L - 1 else None)
    res = acc.result()
    dist = act_halting(h).distribution
    expected = sum(dist[:, l, None, None, None] * states[l] for l in range(L))
    assert torch.allclose(res.output, expected, atol=1e-6)
    assert torch.equal(res.n, act_halting(h).n)


def test_running_mask_stops_after_halting_and_later_scores_are_ignored():
    acc = ACTAccumulator(4, (2,), torch.device("cpu"))
    assert acc.running.all()
    acc.step(torch.zeros(2, 1), torch.tensor([0.995, 0.2]))
    assert acc.running.tolist() == [False, True]
    # a halted position's later scores (here 0.9) change nothing
    acc.step(torch.zeros(2, 1), torch.tensor([0.9, 0.3]))
    acc.step(torch.zeros(2, 1), torch.tensor([0.9, 0.3]))
    acc.step(torch.zeros(2, 1), None)
    res = acc.result()
    assert res.n.tolist() == [1, 4]
    assert torch.allclose(res.ponder_cost, torch.tensor([2.0, 4 + 1 - 0.8]))
    assert acc.ran_units.tolist() == [[True, False, False, False], [True, True, True, True]]


def test_eps_threshold_is_one_minus_eps():
    assert HALT_EPS == 0.01
    just_below = act_halting(torch.tensor([[0.989, 0.0]], dtype=torch.float64))
    at = act_halting(torch.tensor([[0.99, 0.0]], dtype=torch.float64))
    assert just_below.n.item() == 3 and at.n.item() == 1


def test_halting_branch_starts_near_sigmoid_minus_three():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    h = HaltingBranch(8)(x)
    assert h.shape == (4,)
    assert torch.allclose(h, torch.full((4,), torch.sigmoid(torch.tensor(-3.0)).item()))
    hs = SpatialHaltingBranch(8)(x)
    assert hs.shape == (4, 5, 5)
    assert torch.allclose(hs, torch.full((4, 5, 5), 0.0474258731))


def _random_spatial_branch(channels: int, seed: int) -> SpatialHaltingBranch:
    """An eval-mode spatial halting branch with random conv, linear and BN parameters / statistics."""
    torch.manual_seed(seed)
    branch = SpatialHaltingBranch(channels)
    with torch.no_grad():
        branch.local.weight.normal_()
        branch.glob.weight.normal_()
        branch.bn.running_mean.normal_()
        branch.bn.running_var.uniform_(0.5, 2.0)
        branch.bn.weight.normal_()
        branch.bn.bias.normal_()
    return branch.eval()


def test_spatial_halting_branch_local_plus_global_term():
    # the eval path folds BN into a 1x1 C->9 conv + shifted taps: must equal the modules
    branch = _random_spatial_branch(3, seed=0)
    x = torch.randn(2, 3, 6, 7)
    z = branch.bn(x)
    local = torch.nn.functional.conv2d(z, branch.local.weight, branch.local.bias, padding=1)[:, 0]
    glob = z.mean((2, 3)) @ branch.glob.weight[0]
    assert branch.glob.bias is None
    assert torch.allclose(branch(x), torch.sigmoid(local + glob[:, None, None]), atol=1e-6)
    assert count_macs(branch, x[:1]) == 9 * 3 * 6 * 7 + 3  # 9C per position + C for the global term


def test_spatial_halting_branch_channels_last_input_gives_the_same_map():
    branch = _random_spatial_branch(4, seed=1)
    x = torch.randn(2, 4, 5, 6)
    cl = x.contiguous(memory_format=torch.channels_last)  # the sparse executor's layout: a GEMM on rows
    assert torch.allclose(branch(cl), branch(x), atol=1e-6)


def test_accumulator_output_follows_channels_last_states_and_matches_nchw():
    torch.manual_seed(2)
    states = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    scores = [torch.rand(2, 4, 4) * 0.6 for _ in range(2)] + [None]
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        acc = ACTAccumulator(3, (2, 4, 4), "cpu")
        with torch.no_grad():
            for i, (x, h) in enumerate(zip(states, scores)):
                # unit 1 NCHW (dense), later units channels-last (sparse executor): mixed layouts
                acc.step(x if i == 0 else x.contiguous(memory_format=layout), h)
        outs.append(acc.result().output)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert outs[1].is_contiguous() or outs[1].is_contiguous(memory_format=torch.channels_last)


def test_inference_step_equals_autograd_step():
    torch.manual_seed(3)
    states = [torch.randn(3, 2, 5, 5) for _ in range(4)]
    scores = [torch.rand(3, 5, 5) * 0.7 for _ in range(3)] + [None]
    results = []
    for grad in (True, False):
        acc = ACTAccumulator(4, (3, 5, 5), "cpu")
        with torch.set_grad_enabled(grad):
            for x, h in zip(states, scores):
                acc.step(x, h)
        results.append(acc.result())
    a, b = results
    assert torch.equal(a.n, b.n) and torch.equal(a.remainder, b.remainder)
    assert torch.equal(a.distribution, b.distribution)
    assert 1.0 < float(a.n.mean()) < 4.0  # positions halt at varied units
    assert torch.allclose(a.output, b.output, atol=1e-6)


def test_act_halting_branch_eval_folds_bn_after_pooling():
    torch.manual_seed(0)
    branch = HaltingBranch(5)
    with torch.no_grad():
        branch.bn.running_mean.normal_()
        branch.bn.running_var.uniform_(0.5, 2.0)
        branch.fc.weight.normal_()
    x = torch.randn(3, 5, 4, 4)
    expected = torch.sigmoid(branch.fc(branch.eval().bn(x).mean((2, 3))))[:, 0]
    assert torch.allclose(branch(x), expected, atol=1e-6)


@pytest.mark.parametrize("cls", [HaltingBranch, SpatialHaltingBranch])
def test_bn_centres_the_score_gradient_on_nonnegative_features(cls):
    # ReLU features: without centring every weight gets a gradient of the same sign and the
    # logits move by ~ (9) C times the per-weight step (scores saturate within a few steps)
    torch.manual_seed(0)
    x = torch.randn(8, 16, 5, 5).relu() + 1.0

    def weight_grad(branch):
        branch(x).sum().backward()
        return (branch.fc if cls is HaltingBranch else branch.local).weight.grad

    raw = cls(16)
    raw.bn = torch.nn.Identity()
    assert weight_grad(cls(16)).abs().sum() < 0.1 * weight_grad(raw).abs().sum()


def test_halting_branches_receive_gradient_from_ponder_cost():
    torch.manual_seed(0)
    branch = SpatialHaltingBranch(4)
    x = torch.randn(2, 4, 3, 3)
    h = torch.stack([branch(x), branch(x * 0.5)], -1)  # two scores per position, 3 units
    act_halting(h).ponder_cost.mean().backward()
    # lowering the ponder cost means raising the halting scores: the bias gradient is negative
    assert branch.local.bias.grad.item() < 0


@pytest.mark.parametrize("route", ["_local_fold", "_local_taps", "_local_eval"])
@pytest.mark.parametrize("shape", [(1, 5, 8, 8), (2, 3, 6, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_halting_local_term_is_exact_at_the_borders_on_every_route(route, shape, channels_last):
    # BN(x) is zero-padded: the fold route adds only in-map taps, the taps route zero-pads the tap maps
    branch = _random_spatial_branch(shape[1], seed=shape[2])
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def reference():
        return torch.nn.functional.conv2d(branch.bn(x), branch.local.weight, branch.local.bias, padding=1)[:, 0]

    def run():
        scale, shift = bn_affine(branch.bn)
        return getattr(branch, route)(x, scale, shift)

    with torch.no_grad():
        torch.testing.assert_close(run(), reference(), atol=1e-5, rtol=1e-5)


def test_spatial_halting_counts_its_macs_on_the_timed_routes():
    branch = _random_spatial_branch(5, seed=3)
    x = torch.randn(1, 5, 8, 8)  # small: the first call times both routes, which must not be counted
    assert count_macs(branch, x) == 9 * 5 * 8 * 8 + 5
