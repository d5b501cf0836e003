"""MSDNet structure, golden per-exit costs, and the two executors of the multi-exit base."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from ponder import count_macs, create_model
from ponder.models.msdnet import MSDNet, ParallelModule, scale_plan
from conftest import fast_paths
from ponder import fast
from ponder.fast import native, routes
from ponder.nn import set_executor
from ponder.models.multi_exit import MultiExitModel

# (params, conv+linear MACs, official op_counter) cumulative per exit, computed with this library
# from the official configurations. The official-convention CIFAR-100 figures (6.86M, 14.35M,
# 27.54M, 41.71M, 58.48M) and ImageNet step-4 figures (0.34G ... 1.36G; 4.24M ... 23.96M params)
# are the ones the MSDNet / IMTA / L2W papers print.
GOLDEN = {
    ("msdnet_cifar_budgeted", 10): [
        (288094, 6781184, 6848266), (626520, 14185984, 14326804), (983478, 27244288, 27501854),
        (1445984, 41327616, 41668136), (2020874, 58030336, 58422578)],
    ("msdnet_cifar_budgeted", 100): [
        (299704, 6792704, 6859876), (649740, 14209024, 14350024), (1018308, 27278848, 27536684),
        (1492424, 41373696, 41714576), (2078924, 58087936, 58480628)],
    ("msdnet_cifar_anytime", 100): [
        (433876, 14967296, None), (876792, 25259008, None), (1274952, 36780544, None), (1695548, 45972480, None),
        (2178352, 56933888, None), (2603252, 66529280, None), (3067960, 75487744, None)],
    ("msdnet_imagenet_step4", 1000): [
        (4238504, 337214464, 339902824), (8772240, 681654272, 685456720), (13073272, 1003659008, 1008156120),
        (16748416, 1249626240, 1254472688), (23958440, 1355606016, 1360529624)],
    ("msdnet_imagenet_step6", 1000): [
        (7076712, 511324160, None), (15689808, 1166144768, None), (24014008, 1838349440, None),
        (42187744, 2494631424, None), (56529304, 2735131968, None)],
    ("msdnet_imagenet_step7", 1000): [
        (8759240, 612030976, None), (20154896, 1430810112, None), (31730040, 2276388096, None),
        (41860288, 2959942016, None), (62314472, 3246180864, None)],
    ("msdnet_imagenet_step6_base4", 1000): [
        (4238504, 337214464, 339902824), (10775952, 919704064, 924194832), (17842936, 1511827456, 1517433848),
        (24581408, 1985444096, 1991602432), (38678920, 2188148224, 2194420840)],
    ("msdnet_imagenet_step7_base4", 1000): [
        (4238504, 337214464, 339902824), (11889168, 1053431552, 1058266480), (20577208, 1805717120, 1811878152),
        (29158384, 2415342528, 2422156808), (47544824, 2677496448, 2684443568)],
}

HEAD_WIDTHS = {  # classifier input widths c * grFactor[-1] (reference §1.3)
    "msdnet_cifar_budgeted": [88, 136, 104, 200, 208],
    "msdnet_imagenet_step4": [384, 384, 352, 304, 560],
    "msdnet_imagenet_step6": [512, 544, 496, 880, 792],
    "msdnet_imagenet_step7": [576, 640, 608, 528, 976],
    "msdnet_imagenet_step6_base4": [384, 448, 448, 416, 800],
    "msdnet_imagenet_step7_base4": [384, 480, 496, 472, 920],
}

# L2W (Han et al., ECCV 2022) ImageNet MSDNets k = 4 / 6 / 7, first exit after 4 layers in all three:
# params (M) and Mul-Adds at the last exit (G, official op_counter) as the paper prints them.
L2W_PAPER = {"msdnet_imagenet_step4": (23.96, 1.36), "msdnet_imagenet_step6_base4": (38.68, 2.19),
             "msdnet_imagenet_step7_base4": (47.54, 2.68)}


def _meta(name: str, num_classes: int) -> MSDNet:
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes)


@pytest.mark.parametrize("name,num_classes", sorted(GOLDEN))
def test_golden_per_exit_params_and_macs(name, num_classes):
    model = _meta(name, num_classes)
    prof = model.profile_exits(model.default_input_size)
    assert [(p["params"], p["macs"]) for p in prof] == [g[:2] for g in GOLDEN[(name, num_classes)]]
    official = [g[2] for g in GOLDEN[(name, num_classes)]]
    if official[0] is not None:
        assert [p["macs_official"] for p in prof] == official
    assert prof[-1]["params"] == sum(p.numel() for p in model.parameters())
    assert prof[-1]["macs"] == model.ledger(model.default_input_size).total


@pytest.mark.parametrize("name", sorted(HEAD_WIDTHS))
def test_classifier_input_widths(name):
    assert _meta(name, 10).head_inputs == HEAD_WIDTHS[name]


@pytest.mark.parametrize("name", sorted(L2W_PAPER))
def test_l2w_imagenet_presets_match_the_paper(name):
    model = _meta(name, 1000)
    assert model.steps == [4] + [int(name.split("step")[1][0])] * 4
    last = model.profile_exits(model.default_input_size)[-1]
    assert (round(last["params"] / 1e6, 2), round(last["macs_official"] / 1e9, 2)) == L2W_PAPER[name]


def test_ponder_flops_prints_the_l2w_k6_figures(capsys):
    from ponder.cli import main

    assert main(["flops", "msdnet_imagenet_step6_base4"]) == 0
    text = capsys.readouterr().out
    assert "official op_counter" in text
    assert "     4         38,678,920    2,188,148,224         2,194,420,840" in text  # 38.68M, 2.19G as in the paper


def test_cifar_budgeted_structure_and_transitions():
    model = _meta("msdnet_cifar_budgeted", 10)
    assert model.steps == [1, 2, 3, 4, 5]
    plan = [scale_plan(l, 15, 3, "max") for l in range(1, 16)]
    assert plan[:5] == [(3, 3)] * 5 and plan[5] == (3, 2) and plan[6:10] == [(2, 2)] * 4
    assert plan[10] == (2, 1) and plan[11:] == [(1, 1)] * 4
    # transitions after layers 6 (c 52 -> 26) and 11 (56 -> 28): one 1x1 ConvBasic per kept scale
    trans = [(k, j, m) for k, block in enumerate(model.blocks) for j, m in enumerate(block) if isinstance(m, ParallelModule)]
    assert [(k, j) for k, j, _ in trans] == [(2, 3), (4, 1)]  # block 3 = layers 4-6, block 5 = layers 11-15
    t1, t2 = trans[0][2].m, trans[1][2].m
    assert [m.net[0].in_channels for m in t1] == [52 * 2, 52 * 4] and [m.net[0].out_channels for m in t1] == [52, 104]
    assert [m.net[0].in_channels for m in t2] == [56 * 4] and [m.net[0].out_channels for m in t2] == [112]


def test_official_state_dict_layout_and_imagenet_variants_use_base_equal_step():
    keys = set(_meta("msdnet_cifar_budgeted", 10).state_dict())
    for k in ["blocks.0.0.layers.0.net.0.weight", "blocks.0.1.layers.0.conv_normal.net.0.weight",
              "blocks.0.1.layers.1.conv_down.net.3.weight", "classifier.4.m.1.net.1.running_mean",
              "classifier.4.linear.bias"]:
        assert k in keys
    for k in (4, 6, 7):
        assert _meta(f"msdnet_imagenet_step{k}", 1000).steps == [k] * 5


def test_paper_init_and_pytorch_init_option():
    torch.manual_seed(0)
    m = create_model("msdnet_cifar_budgeted", n_blocks=2)
    conv = m.blocks[0][1].layers[0].conv_normal.net[3]  # 3x3, 6 output channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 6)), rel=0.15)
    assert all(h.linear.bias.abs().sum() == 0 for h in m.classifier)
    torch.manual_seed(0)
    d = create_model("msdnet_cifar_budgeted", n_blocks=2, init="pytorch")
    assert d.classifier[0].linear.bias.abs().sum() > 0


def test_prune_min_and_errors():
    m = create_model("msdnet_cifar_budgeted", n_blocks=3, prune="min", n_channels=4, growth_rate=2)
    assert isinstance(m, MultiExitModel) and m.num_exits == 3
    with torch.no_grad():
        assert len(m(torch.randn(2, 3, 32, 32)).exit_logits) == 3
    with pytest.raises(ValueError, match="stepmode"):
        create_model("msdnet_cifar_budgeted", stepmode="linear")
    with pytest.raises(ValueError, match="expects input"):
        create_model("msdnet_cifar_budgeted")(torch.randn(1, 1, 32, 32))


# ---- executors -------------------------------------------------------------------------------
def _small(seed: int = 0, **kw) -> MSDNet:
    torch.manual_seed(seed)
    model = create_model("msdnet_cifar_budgeted", n_blocks=4, n_channels=8, growth_rate=4, head_width=16, **kw)
    model.train()
    with torch.no_grad():  # give BN non-trivial statistics
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def _middle_thresholds(model: MSDNet, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        out = model(x)
    conf = torch.stack([z.softmax(1).amax(1) for z in out.exit_logits]).sort(dim=1).values
    mid = conf.shape[1] // 2  # halfway between two samples: float noise between kernels can't flip an exit
    return ((conf[:, mid - 1] + conf[:, mid]) / 2)[:-1].tolist()


def test_executors_agree_batched_and_batch1():
    model = _small()
    x = torch.randn(24, 3, 32, 32)
    model.set_thresholds(_middle_thresholds(model, x))
    with torch.no_grad():
        dense = model(x)
        set_executor(model, "sparse")
        sparse = model(x)
        single = [model(x[i:i + 1]) for i in range(x.shape[0])]
    counts = torch.bincount(dense.exit_index, minlength=4)
    assert (counts > 0).sum() >= 3, counts  # the test exercises several exits
    assert torch.equal(dense.exit_index, sparse.exit_index)
    assert torch.equal(dense.logits.argmax(1), sparse.logits.argmax(1))
    torch.testing.assert_close(dense.logits, sparse.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(dense.macs, sparse.macs)
    assert sparse.exit_logits is None
    assert torch.equal(torch.cat([o.exit_index for o in single]), dense.exit_index)
    torch.testing.assert_close(torch.cat([o.logits for o in single]), dense.logits, rtol=1e-4, atol=1e-4)
    costs = model.exit_costs()
    assert dense.macs.tolist() == [float(costs[i]) for i in dense.exit_index]


def test_no_thresholds_means_last_exit_and_threshold_validation():
    model = _small()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        set_executor(model, "sparse")
        sp = model(x)
    assert out.exit_index.tolist() == [3, 3, 3] == sp.exit_index.tolist()
    torch.testing.assert_close(out.logits, out.exit_logits[-1])
    assert out.macs.tolist() == [float(model.ledger((3, 32, 32)).total)] * 3
    with pytest.raises(ValueError, match="set_thresholds needs 3"):
        model.set_thresholds([0.5])
    model.set_thresholds([0.5, 0.5, 0.5, -math.inf])
    assert model.thresholds[-1] == -math.inf


def test_force_keep_rate_is_deterministic_per_sample_and_executor_independent():
    model = _small()
    x = torch.randn(64, 3, 32, 32)
    model.force_keep_rate(0.5, seed=3)
    with torch.no_grad():
        a = model(x).exit_index
        b = model(x.flip(0)).exit_index.flip(0)  # other batch order: same per-sample decision
        set_executor(model, "sparse")
        c = model(x).exit_index
        d = torch.cat([model(x[i:i + 1]).exit_index for i in range(8)])
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a[:8], d)
    frac_exit1 = (a == 0).float().mean().item()
    assert 0.3 < frac_exit1 < 0.7
    model.force_keep_rate(1.0)
    with torch.no_grad():
        assert (model(x).exit_index == 3).all()
    model.force_keep_rate(None)
    with pytest.raises(ValueError, match="keep rate"):
        model.force_keep_rate(1.5)


def test_host_keep_number_equals_the_tensor_one_bit_for_bit():
    from ponder.nn.forced import PRIME as _PRIME, keep_uniform, keep_uniforms

    g = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.randint(0, _PRIME, (500,), generator=g), torch.tensor([0, 1, _PRIME - 1])])
    for exit_k, seed in ((0, 0), (3, 7), (1, 123456)):
        want = keep_uniforms(keys, exit_k, seed).tolist()
        assert [keep_uniform(k, exit_k, seed) for k in keys.tolist()] == want


def test_ledger_equals_flop_counter_on_sparse_executor_at_batch1_for_every_exit():
    model = _small()
    set_executor(model, "sparse")
    x = torch.randn(1, 3, 32, 32)
    costs = model.exit_costs()
    for k in range(model.num_exits):
        model.set_thresholds([-math.inf if j == k else math.inf for j in range(model.num_exits - 1)])
        with torch.no_grad():
            out = model(x)
        assert out.exit_index.item() == k
        assert out.macs.item() == costs[k] == count_macs(model, x)


def test_dense_baseline_runs_last_exit_only():
    model = _small()
    x = torch.randn(2, 3, 32, 32)
    base = model.dense_baseline()
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x).exit_logits[-1])
    assert count_macs(base, x[:1]) == model.dense_macs() < model.exit_costs()[-1]
    assert sum(1 for _ in base.parameters()) == 0  # shares, does not own, the weights


@fast_paths
@pytest.mark.parametrize("whole", [False, True])
def test_exit_head_inference_path_equals_the_module_path_after_training_steps(monkeypatch, whole):
    import ponder.fast.plan as fast_plan
    from ponder.models.exit_head import ExitHead

    if whole and native.load("small_conv") is None:
        pytest.skip("the compiled kernels are not built here (ponder kernels build)")
    monkeypatch.setitem(routes._OVERRIDE, "exit_head", "whole" if whole else "prepared")
    torch.manual_seed(0)
    head = ExitHead(16, 32, 10)
    assert head.m[0].net[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 16, 8, 8)
    for step in range(3):  # each round moves the BN statistics (and a linear weight): the plans must follow
        head.train()
        head(torch.randn(8, 16, 8, 8) * 2 + 1)
        head.eval()
        if step == 1:
            with torch.no_grad():
                head.linear.weight.mul_(0.5)  # in place, as an optimizer step
        if step == 2:
            head.linear.weight = torch.nn.Parameter(head.linear.weight.detach() + 1.0)  # a new parameter
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):  # channels-last: the planned path
            with torch.no_grad():
                feat, logits = head.classify(xin)
            want = head.m(x).flatten(1)
            torch.testing.assert_close(feat, want.detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits, head(x).detach(), rtol=1e-4, atol=1e-5)
    (entry,) = fast_plan._PLANS[head].values()  # (snapshot, plan): one plan for the one input shape
    assert ("bound_exit_head" in entry[1].__qualname__) == whole
    plan = entry[1]
    gone = weakref.ref(head)
    del head, plan
    gc.collect()
    assert gone() is None  # the plans do not keep their head alive


def test_activation_layout_is_channels_last_at_inference_and_survives_sample_selection():
    from ponder.nn.exits import select_samples

    model = _small()
    cl = torch.channels_last
    x = torch.randn(4, 3, 32, 32)
    assert model.input_layout(x) is x  # with autograd (training): NCHW, DDP's gradient layout
    with torch.no_grad():
        assert model.input_layout(x[:1]).is_contiguous(memory_format=cl)  # every batch size
        assert model.input_layout(x).is_contiguous(memory_format=cl)
        model.channels_last = False
        assert model.input_layout(x) is x
    model.channels_last = True
    assert model.input_layout(x).is_contiguous(memory_format=cl)
    model.channels_last = None
    idx = torch.tensor([3, 1])
    for source in (x, x.contiguous(memory_format=cl)):
        kept = select_samples([source, torch.randn(4, 5)], idx)  # keeps the layout it was given
        assert kept[0].is_contiguous(memory_format=cl) == (source is not x) and kept[1].shape == (2, 5)
        assert kept[0].is_contiguous() == (source is x) and torch.equal(kept[0], x[idx])


@pytest.mark.parametrize("case", ["thresholds", "collaboration", "keep_rate", "ranet"])
def test_compiled_exit_step_equals_the_index_ops(monkeypatch, case):
    if native.load("exit_step") is None:
        pytest.skip("the compiled kernels are not built here (ponder kernels build)")
    if case == "ranet":
        torch.manual_seed(0)
        model = create_model("ranet_cifar_c1").eval()
        x = torch.randn(12, 3, 32, 32)  # a dict state with nested lists
    else:
        model = _small(collaboration=case == "collaboration")  # the carry: the collaboration logits
        x = torch.randn(24, 3, 32, 32)
    if case == "keep_rate":
        model.force_keep_rate(0.6, seed=1)  # the per-sample keys travel with the samples
    else:
        model.set_thresholds(_middle_thresholds(model, x))
    set_executor(model, "sparse")
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setattr(fast, "exit_step", lambda *args: None)
        indexed = model(x)
    assert len(set(fused.exit_index.tolist())) >= 2  # samples left at several exits
    assert torch.equal(fused.exit_index, indexed.exit_index) and torch.equal(fused.macs, indexed.macs)
    assert torch.equal(fused.logits, indexed.logits)


def test_batch1_exit_test_rounds_the_threshold_like_the_batched_one():
    model = _small()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        conf = float(model(x).exit_logits[0].softmax(1).amax())  # a float32 value
    above = math.nextafter(conf, math.inf)  # above it as a double, equal to it in float32
    assert above > conf and float(torch.tensor(above, dtype=torch.float32)) == conf
    model.set_thresholds([above, 2.0, 2.0])
    with torch.no_grad():
        tensor_test = model(x).exit_index  # compute-all: the float32 tensor comparison
        set_executor(model, "sparse")
        host_test = model(x).exit_index  # batch 1: the comparison on one host value
    assert tensor_test.tolist() == [0] == host_test.tolist()
