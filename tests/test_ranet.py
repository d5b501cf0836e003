"""RANet: structure against the reference tables, golden per-exit costs, executors, ledger vs counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ponder import create_model
from ponder.cost import count_macs, count_params
from ponder.models.ranet import RANet, ranet_plan
from ponder.nn.executor import set_executor

torch.set_num_threads(1)

# Reference (early_exit.md section 2.3): block codes per flow and exit input widths.
C1_BLOCKS = [["N2", "N4"], ["F2", "F4↓T", "N6", "N8"], ["F2", "F4↓T", "F6", "F8↓T", "N10", "N12"]]
C1_WIDTHS = [112, 208, 145, 241, 146, 218]
C2_BLOCKS = [["N2", "N4"], ["F2", "F4↓T", "N6", "N8"], ["F2", "F4", "F6T", "F8↓", "N10", "N12"],
             ["F2", "F4T", "F6", "F8↓", "F10T", "F12↓", "N14", "N16"]]
C2_WIDTHS = [112, 208, 145, 241, 410, 554, 355, 451]

# Golden per-exit cumulative (params, conv+linear MACs, official op_counter, interpolation MACs)
# at 3x32x32, 10 classes: computed by `_layer_arithmetic` below (layer-by-layer arithmetic from
# the reference rules, sharing no code with ponder) and equal to the FlopCounterMode ledger.
C1_GOLDEN = [(347050, 8316160, 8360714, 0), (876660, 21686784, 21765140, 0),
             (1270165, 32695872, 32844062, 56832), (1754271, 41354048, 41523752, 56832),
             (2130143, 52924800, 53225778, 240128), (2547601, 58607744, 58921020, 240128)]
C2_GOLDEN = [(356330, 10675456, 10728202, 0), (885940, 24046080, 24132628, 0),
             (1279445, 35055168, 35211550, 56832), (1763551, 43713344, 43891240, 56832),
             (2659597, 92600384, 93010226, 238080), (3616119, 114167104, 114607676, 238080),
             (4381329, 163118464, 163942086, 780544), (5094107, 174811776, 175650768, 780544)]


def _layer_arithmetic(levels, gr, bn, n_blocks=2, block_step=2, step=2, mode="lg", nc=16, g0=6,
                      cf=0.25, red=0.5, classes=10, res=32):
    """Per-exit (params, MACs, official ops, interp MACs) of a CIFAR RANet, by hand arithmetic.

    Conv: C_in C_out k^2 H_out W_out MACs (official: + C_out H_out W_out for its ReLU), BN 2C
    params; head Linear 128 K MACs (official: + K bias + 128*4 avg-pool); 4 MACs per output
    element of each bilinear resize that changes the size.
    """
    cost = {"params": 0, "macs": 0, "official": 0, "interp": 0}

    def conv(cin, cout, k, r):
        cost["macs"] += cin * cout * k * k * r * r
        cost["official"] += cin * cout * k * k * r * r + cout * r * r
        cost["params"] += cin * cout * k * k + 2 * cout

    def conv_bn(cin, cout, w, r_in, r_out):
        conv(cin, min(cin, w * cout), 1, r_in)
        conv(min(cin, w * cout), cout, 3, r_out)

    flow_res = [res // 2 ** (max(levels) - lv) for lv in levels]
    widths = [nc * f for f in gr]
    conv(3, widths[-1], 3, res)
    for j in range(len(levels) - 2, -1, -1):
        conv(widths[j + 1], widths[j], 3, flow_res[j])
    counts = [n_blocks + block_step * i for i in range(len(levels))]
    fused = [0] + counts[:-1]
    exits, prev = [], None
    for i, level in enumerate(levels):
        g, c, r = g0 * gr[i], widths[i], flow_res[i]
        downs = set(fused[: i + 1][-(level - 1):]) if level > 1 else set()
        trans = {math.floor(m * counts[i] / level) for m in range(1, level)}
        blocks = []
        for k in range(1, counts[i] + 1):
            layers = step * k if mode == "lg" else step
            states = [(c, r)]
            if k <= fused[i]:
                coarse, na = prev[k - 1], math.floor(g * cf)
                for j in range(layers):
                    r_out = r // 2 if (k in downs and j == layers - 1) else r
                    conv_bn(c, g - na, bn[i], r, r_out)
                    conv_bn(coarse[j][0], na, bn[i - 1], coarse[j][1], coarse[j][1])
                    cost["interp"] += 4 * r_out * r_out * ((c if r_out != r else 0) + (na if coarse[j][1] != r_out else 0))
                    c, r = c + g, r_out
                    states.append((c, r))
                extra = math.floor(c * cf)
                conv(coarse[-1][0], extra, 1, coarse[-1][1])
                cost["interp"] += 4 * extra * r * r if coarse[-1][1] != r else 0
                c += extra
            else:
                for j in range(layers):
                    conv_bn(c, g, bn[i], r, r)
                    c += g
                    states.append((c, r))
            if k in trans:
                conv(c, math.floor(red * c), 1, r)
                c = math.floor(red * c)
            blocks.append(states)
            if k > fused[i]:  # exit head: two ConvBasic 3x3/2, avg-pool 2, Linear
                conv(c, 128, 3, r // 2)
                conv(128, 128, 3, r // 4)
                cost["macs"] += 128 * classes
                cost["official"] += 128 * classes + classes + 128 * 4
                cost["params"] += 128 * classes + classes
                exits.append((cost["params"], cost["macs"], cost["official"], cost["interp"]))
        prev = blocks
    return exits


@pytest.fixture(scope="module")
def c1() -> RANet:
    torch.manual_seed(0)
    return create_model("ranet_cifar_c1").eval()


@pytest.fixture(scope="module")
def c2() -> RANet:
    torch.manual_seed(0)
    return create_model("ranet_cifar_c2").eval()


def _codes(model: RANet) -> list[list[str]]:
    return [[s.code for s in specs] for specs in model.plan]


def test_model_c1_structure_matches_reference(c1):
    assert c1.num_exits == 6
    assert _codes(c1) == C1_BLOCKS
    assert c1.exit_channels() == C1_WIDTHS
    assert [[s.in_channels for s in f][0] for f in c1.plan] == [64, 32, 16]  # 16 * grFactor 4-2-1


def test_model_c2_structure_matches_reference(c2):
    assert c2.num_exits == 8
    assert _codes(c2) == C2_BLOCKS
    assert c2.exit_channels() == C2_WIDTHS


def test_stem_resolutions_and_every_exit_reads_8x8(c1):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert [t.shape[-1] for t in c1.stem(x)] == [8, 16, 32]
        assert [t.shape[1] for t in c1.stem(x)] == [64, 32, 16]
        state = x
        for k in range(c1.num_exits):
            state = c1.run_block(k, state)
            assert tuple(state["x"].shape) == (2, C1_WIDTHS[k], 8, 8)


def test_block_outputs_have_planned_channels(c2):
    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, out, key=(i, b): seen.__setitem__(key, out[0].shape[1]))
             for i, flow in enumerate(c2.flows) for b, block in enumerate(flow)]
    with torch.no_grad():
        c2(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == {(s.flow, s.index - 1): s.out_channels for specs in c2.plan for s in specs}


def test_golden_figures_are_the_layer_arithmetic():
    assert _layer_arithmetic((1, 2, 3), (4, 2, 1), (4, 2, 1)) == C1_GOLDEN
    assert _layer_arithmetic((1, 2, 2, 3), (4, 2, 2, 1), (4, 2, 2, 1)) == C2_GOLDEN


@pytest.mark.parametrize("name,golden", [("ranet_cifar_c1", C1_GOLDEN), ("ranet_cifar_c2", C2_GOLDEN)])
def test_golden_per_exit_cumulative_costs(name, golden, c1, c2):
    model = c1 if name == "ranet_cifar_c1" else c2
    rows = model.profile_exits((3, 32, 32))
    assert [(r["params"], r["macs"], r["macs_official"], r["interp_macs"]) for r in rows] == golden
    assert rows[-1]["params"] == count_params(model)  # the last exit uses every parameter
    assert model.ledger((3, 32, 32)).total == golden[-1][1]


def test_anytime_setting_and_100_classes_match_layer_arithmetic():
    torch.manual_seed(0)
    model = create_model("ranet_cifar_anytime", num_classes=100)
    want = _layer_arithmetic((1, 2, 3, 3), (4, 2, 1, 1), (4, 2, 1, 1), step=4, mode="even", classes=100)
    rows = model.profile_exits((3, 32, 32))
    assert [(r["params"], r["macs"], r["macs_official"], r["interp_macs"]) for r in rows] == want


def test_ledger_equals_flop_counter_on_sparse_executor_at_batch_1(c1):
    """For every exit: FlopCounterMode of the real early-exit forward == the charged MACs."""
    x = torch.randn(1, 3, 32, 32)
    costs = c1.exit_costs((3, 32, 32))
    interp = c1.interp_macs((3, 32, 32))
    bilinear = {torch.ops.aten.upsample_bilinear2d: lambda *a, out_shape, **k: 2 * 4 * math.prod(out_shape)}
    set_executor(c1, "sparse")
    try:
        for k in range(c1.num_exits):
            c1.set_thresholds([2.0] * k + [0.0] * (c1.num_exits - 1 - k))  # leave exactly at exit k
            with torch.no_grad():
                out = c1(x)
                assert count_macs(c1, x) == int(out.macs[0]) == costs[k]
                with FlopCounterMode(display=False, custom_mapping=bilinear) as fc:
                    c1(x)
            assert int(out.exit_index[0]) == k
            assert fc.get_total_flops() // 2 == costs[k] + interp[k]
    finally:
        c1.set_thresholds(None)
        set_executor(c1, "masked")


def test_compute_all_and_sparse_executor_agree(c1):
    torch.manual_seed(1)
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        probs = [torch.softmax(z, 1).amax(1) for z in c1(x).exit_logits]
        # thresholds at per-exit quantiles so that samples leave at several different exits
        c1.set_thresholds([float(p.quantile(0.75)) for p in probs[:-1]])
        try:
            full = c1(x)
            set_executor(c1, "sparse")
            sparse = c1(x)
            singles = [c1(x[i:i + 1]) for i in range(x.shape[0])]
        finally:
            set_executor(c1, "masked")
            c1.set_thresholds(None)
    assert len(set(full.exit_index.tolist())) >= 3
    assert torch.equal(full.exit_index, sparse.exit_index)
    # the sparse executor's smaller batches may run other conv kernels (timed per batch-size bucket)
    torch.testing.assert_close(full.logits, sparse.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(full.macs, sparse.macs)
    assert torch.equal(torch.cat([s.exit_index for s in singles]), full.exit_index)
    # batch 1 runs other conv kernels (logits reach ~1e3 here): compare relative to size
    torch.testing.assert_close(torch.cat([s.logits for s in singles]), full.logits, rtol=1e-4, atol=1e-4)


def test_every_parameter_gets_a_gradient_from_the_exits():
    torch.manual_seed(0)
    model = create_model("ranet_cifar_c1", num_classes=5)
    model.grad_equilibrium = True
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out.exit_logits) == 6 and out.exit_logits[0].shape == (2, 5)
    sum(z.logsumexp(1).sum() for z in out.exit_logits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_plan_rules_for_imagenet_and_anytime_settings():
    plan = ranet_plan("1-2-3-4", "4-2-2-1", n_blocks=2, block_step=2, step=8, stepmode="even",
                      n_channels=32, growth_rate=16)
    assert [[s.code for s in f] for f in plan] == [
        ["N8"] * 2, ["F8", "F8↓T", "N8", "N8"], ["F8", "F8↓T", "F8", "F8↓T", "N8", "N8"],
        ["F8", "F8↓T", "F8", "F8↓T", "F8", "F8↓T", "N8", "N8"]]
    assert [s.out_channels for s in plan[0]] == [640, 1152]  # 32*4 + 8*64, then + 8*64
    assert create_model("ranet_cifar_anytime").num_exits == 8


def test_imagenet_stem_and_heads_at_224():
    model = create_model("ranet_imagenet", num_classes=7, n_channels=4, growth_rate=4).eval()
    assert model.default_input_size == (3, 224, 224) and model.num_exits == 8
    with torch.no_grad():
        assert [t.shape[-1] for t in model.stem(torch.zeros(1, 3, 224, 224))] == [7, 14, 28, 56]
        out = model(torch.randn(1, 3, 224, 224))
    assert len(out.exit_logits) == 8 and out.logits.shape == (1, 7)
    assert all(h.width == c for h, c in zip(model.heads, model.exit_channels()))  # heads keep full width


def test_msr_init_and_official_stem_option():
    torch.manual_seed(0)
    msr = create_model("ranet_cifar_c1")
    conv = msr.flows[0][0].layers[0][1].net[0]  # a 3x3 conv of flow 0
    assert abs(conv.weight.std().item() - math.sqrt(2 / (9 * conv.out_channels))) < 0.02
    assert all(int(torch.count_nonzero(h.linear.bias.detach())) == 0 for h in msr.heads)
    official = create_model("ranet_cifar_c1", init="official")
    stem_conv = official.stem.layers[0].net[0]
    bound = 1 / math.sqrt(3 * 9)  # PyTorch default: kaiming-uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), +)
    assert float(stem_conv.weight.detach().abs().max()) <= bound


@pytest.mark.parametrize("kwargs,match", [
    ({"scale_list": (2, 3), "gr_factor": (2, 1), "bn_factor": (2, 1)}, "start at 1"),
    ({"stepmode": "linear"}, "stepmode"),
    ({"bn_factor": (4, 2)}, "bn_factor"),
    ({"growth_rate": 1}, "compress_factor"),
    ({"init": "xavier"}, "init"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RANet(**kwargs)


def test_multi_exit_method_trains_ranet_with_imta_stage_2_heads():
    from ponder.methods.base import create_method

    torch.manual_seed(0)
    model = create_model("ranet_cifar_c1", num_classes=4, collaboration=True)
    method = create_method("multi_exit", model, collaboration=True, kd_gamma=0.5, kd_temperature=4.0)
    step = method.training_step(model, torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 3]))
    step.loss.backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert grads and all(has == n.startswith("collab.") for n, has in grads.items())
    assert "teacher_logits" in step.output.extras and torch.isfinite(step.loss)
