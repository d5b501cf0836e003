"""Registry behaviour and cost-accounting primitives."""

import pytest
import torch
import torch.nn as nn

import ponder
from ponder.cost import CostLedger, count_macs, unit_macs
from ponder.registry import UnknownModelError


def test_list_models_filters_with_pattern():
    names = ponder.list_models("resnet*_cifar")
    assert names == sorted(names)
    assert {"resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "resnet110_cifar"} <= set(names)
    assert "resnet50" not in names


def test_create_model_drops_none_kwargs_so_defaults_hold():
    model = ponder.create_model("resnet20_cifar", num_classes=None, shortcut=None)
    assert model.num_classes == 10 and model.shortcut_type == "A"


def test_unknown_model_is_one_clear_sentence():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet21_cifar'; run `ponder models`"):
        ponder.create_model("resnet21_cifar")


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        ponder.register_model(ponder.registry._MODELS["resnet20_cifar"])


def test_count_macs_conv_and_linear():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    assert count_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 3 * 9 * 100
    assert count_macs(nn.Linear(5, 4), torch.zeros(2, 5)) == 2 * 5 * 4


def test_count_macs_is_invisible_to_an_enclosing_counter():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as outer:
        count_macs(nn.Linear(5, 4), torch.zeros(1, 5))
    assert outer.get_total_flops() == 0


def test_unit_macs_charges_nested_and_repeated_units():
    inner = nn.Linear(4, 4, bias=False)
    outer = nn.Sequential(inner, nn.ReLU(), nn.Linear(4, 2))
    x = torch.zeros(1, 4)
    costs = unit_macs(lambda: (outer(x), inner(x)), {"outer": outer, "inner": inner})
    assert costs == {"outer": 16 + 8, "inner": 32, "total": 16 + 8 + 16}


def test_ledger_charge_is_decision_weighted_sum():
    led = CostLedger(input_size=(3, 8, 8), units={"a": 10, "b": 100}, total=110)
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert led.charge(("a", "b"), d).tolist() == [10.0, 110.0, 0.0]
    assert led.charge_prefix(("a", "b"), torch.tensor([1, 0, 1])).tolist() == [110.0, 10.0, 110.0]
    assert led.charge(("a", "b"), torch.tensor([[3, 0]])).tolist() == [30.0]  # counts (per-position units)


def test_profile_json_has_integer_params_and_macs_and_blocks():
    prof = ponder.profile(ponder.create_model("resnet20_cifar"), (3, 32, 32)).to_json()
    assert isinstance(prof["params"], int) and isinstance(prof["macs"], int)
    assert len(prof["blocks"]) == 9 and "exits" not in prof
