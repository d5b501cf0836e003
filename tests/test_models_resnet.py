"""CIFAR and ImageNet ResNets: golden costs, torchvision layout, output contract."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ponder
from ponder.models.resnet import load_torchvision_weights

# conv + linear MACs, 10 classes, option-A shortcuts (reference: block_skipping.md 1.1)
GOLDEN_CIFAR_MACS = {20: 40_551_040, 32: 68_862_592, 56: 125_485_696, 110: 252_887_680}
# torchvision parameter counts (1000 classes)
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
}


@pytest.mark.parametrize("depth", sorted(GOLDEN_CIFAR_MACS))
def test_cifar_resnet_dense_macs_match_reference(depth):
    model = ponder.create_model(f"resnet{depth}_cifar")
    assert ponder.profile(model, (3, 32, 32)).macs == GOLDEN_CIFAR_MACS[depth]


def test_avgpool_shortcut_has_option_a_params_and_macs_and_the_counter_agrees():
    a = ponder.create_model("resnet110_cifar", shortcut="A")
    pool = ponder.create_model("resnet110_cifar", shortcut="avgpool")
    pa, pp = ponder.profile(a, (3, 32, 32)), ponder.profile(pool, (3, 32, 32))
    assert (pp.params, pp.macs) == (pa.params, pa.macs) and pp.macs == GOLDEN_CIFAR_MACS[110]
    with FlopCounterMode(display=False) as counter:
        pool(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * pp.macs


def test_projection_shortcut_adds_exactly_two_1x1_convs():
    a = ponder.profile(ponder.create_model("resnet110_cifar", shortcut="A"), (3, 32, 32))
    b = ponder.profile(ponder.create_model("resnet110_cifar", shortcut="B"), (3, 32, 32))
    assert b.macs - a.macs == 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8 == 262_144
    assert b.params > a.params


def test_resnet101_block_costs_match_reference():
    led = ponder.create_model("resnet101").ledger((3, 224, 224))
    assert led.total == 7_801_405_440
    assert 2 * led["blocks.0"] == 359_661_568 + 102_760_448  # first block of stage 1 with downsample
    assert 2 * led["blocks.1"] == 436_731_904  # a regular bottleneck
    assert 2 * led["blocks.3"] == 539_492_352 + 205_520_896  # first block of stage 2
    assert led.sum([f"blocks.{i}" for i in range(33)]) + led["stem"] + led["head"] == led.total


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_resnet_parameter_counts_match_torchvision(name):
    assert ponder.profile(ponder.create_model(name), (3, 224, 224)).params == TORCHVISION_PARAMS[name]


def _torchvision_layout(layers, bottleneck, num_classes=1000):
    """State-dict key -> shape of a torchvision ResNet, written from torchvision's naming rules."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin, exp = 64, 4 if bottleneck else 1
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(n):
            p = f"layer{s}.{j}"
            stride = 2 if (s > 1 and j == 0) else 1
            if bottleneck:
                keys.update({f"{p}.conv1.weight": (planes, cin, 1, 1), **bn(f"{p}.bn1", planes),
                             f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes),
                             f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **bn(f"{p}.bn3", planes * 4)})
            else:
                keys.update({f"{p}.conv1.weight": (planes, cin, 3, 3), **bn(f"{p}.bn1", planes),
                             f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes)})
            if stride != 1 or cin != planes * exp:
                keys.update({f"{p}.downsample.0.weight": (planes * exp, cin, 1, 1),
                             **bn(f"{p}.downsample.1", planes * exp)})
            cin = planes * exp
    keys.update({"fc.weight": (num_classes, 512 * exp), "fc.bias": (num_classes,)})
    return keys


@pytest.mark.parametrize("name,layers,bottleneck", [
    ("resnet18", [2, 2, 2, 2], False), ("resnet50", [3, 4, 6, 3], True)])
def test_torchvision_state_dict_loads_without_conversion(tmp_path, name, layers, bottleneck):
    layout = _torchvision_layout(layers, bottleneck)
    model = ponder.create_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked")
                 else torch.randn(s, generator=g)) for k, s in layout.items()}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    load_torchvision_weights(model, str(path))
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_static_output_contract_and_ledger_equals_counter():
    model = ponder.create_model("resnet20_cifar", num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.logits.shape == (3, 7)
    assert out.macs.dtype == torch.float64 and out.macs.shape == (3,)
    with FlopCounterMode(display=False) as fc:
        one = model(x[:1])
    assert one.macs.item() == fc.get_total_flops() // 2


def test_ledger_scales_with_resolution_and_is_cached():
    model = ponder.create_model("resnet18")
    small, big = model.ledger((3, 224, 224)), model.ledger((3, 352, 352))
    assert model.ledger((3, 224, 224)) is small
    assert big.total > 2 * small.total
    assert model(torch.randn(1, 3, 352, 352)).macs.item() == big.total


def test_wrong_input_gets_one_clear_sentence():
    model = ponder.create_model("resnet20_cifar")
    with pytest.raises(ValueError, match=r"expects input of shape \[batch, 3, H, W\]"):
        model(torch.randn(2, 1, 32, 32))


def test_bad_depth_and_shortcut_are_rejected():
    from ponder.models.resnet import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(depth=20, shortcut="C")


def test_zero_pad_shortcut_is_parameter_free_and_pads_evenly():
    from ponder.models.resnet import ZeroPadShortcut

    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_avgpool_shortcut_pools_2x2_and_appends_zero_channels_after_the_input():
    from ponder.models.resnet import AvgPoolShortcut

    x = torch.tensor([[[[1.0, 2.0, 5.0, 7.0],
                        [3.0, 6.0, 1.0, 3.0]],
                       [[-4.0, 0.0, 8.0, 8.0],
                        [0.0, 2.0, 0.0, 4.0]]]])  # [1, 2, 2, 4]
    y = AvgPoolShortcut(2, 4, 2)(x)
    want = torch.tensor([[[[3.0, 4.0]], [[-0.5, 5.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # [1, 4, 1, 2]
    assert torch.equal(y, want)
    assert sum(p.numel() for p in AvgPoolShortcut(2, 4, 2).parameters()) == 0
    # an odd side: the last window averages the pixels it covers (the strided 3x3 branch's shape)
    odd = AvgPoolShortcut(1, 2, 2)(torch.arange(9.0).view(1, 1, 3, 3))
    assert torch.equal(odd[0, 0], torch.tensor([[2.0, 3.5], [6.5, 8.0]])) and odd.shape == (1, 2, 2, 2)
