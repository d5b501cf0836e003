"""One contract test over the whole registry: every model, whatever its family.

For each registered model: ``forward`` returns a :class:`DynamicOutput` with ``[B, classes]`` logits
and ``[B]`` float64 MACs; ``eval()`` is deterministic; the per-sample MACs at batch 1 equal
``FlopCounterMode`` on the executed path; and for dynamic models, the masked and sparse executors
take the same hard decisions with the same costs and logits to float rounding, and ``set_budget``
reaches a reachable target within 3 % on held-out images.
"""

from __future__ import annotations

import pytest
import torch

from ponder import DynamicOutput, count_macs, create_model, list_models
from ponder.models.base import DynamicModel
from ponder.models.multi_exit import MultiExitModel
from ponder.nn.thresholds import exit_proportions, fit_thresholds
from ponder.nn.executor import set_executor
from ponder.registry import model_info

# (input size, held-out images) per model: ImageNet networks run at 64 px where they are fully
# convolutional (the multi-exit ones need their 224 px: their heads expect a 7x7 map).


def _setting(name: str) -> tuple[tuple[int, int, int], int]:
    if name.startswith(("msdnet_imagenet", "ranet_imagenet")):
        return (3, 224, 224), 8
    if name.endswith("_cifar") or name.startswith(("msdnet_cifar", "ranet_cifar")):
        return (3, 32, 32), 16
    return (3, 64, 64), 4


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    for m in model.modules():  # decisions that vary per sample: untrained halting branches start constant
        if type(m).__name__ in ("HaltingBranch", "SpatialHaltingBranch", "PooledRouter"):
            for p in m.parameters():
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


MODELS = list_models()


@pytest.mark.parametrize("name", MODELS)
def test_registry_describes_the_model_without_building_it(name):
    info = model_info(name)
    assert info.family in ("static", "early_exit", "skipping", "spatial") and info.paper
    assert issubclass(info.cls, DynamicModel) == (info.family != "static")


@pytest.mark.parametrize("name", MODELS)
def test_output_type_determinism_and_batch1_cost(name):
    size, _ = _setting(name)
    model = _build(name)
    dynamic = isinstance(model, DynamicModel)
    assert dynamic == (model_info(name).family != "static") == model.is_dynamic
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *size, generator=g)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert isinstance(a, DynamicOutput) and a.logits.shape == (2, 10)
    assert a.macs.shape == (2,) and a.macs.dtype == torch.float64 and bool((a.macs > 0).all())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.macs, b.macs)  # eval() is deterministic
    for field in ("exit_index", "gates"):
        if getattr(a, field) is not None:
            assert torch.equal(getattr(a, field), getattr(b, field))
    if dynamic:
        set_executor(model, "sparse")
        model.force_keep_rate(0.5, seed=2)  # mixed decisions: a path through some units, not others
    x1 = x[:1]
    with torch.no_grad():
        charged = model(x1).macs.item()
    assert charged == count_macs(model, x1), f"{name}: the ledger disagrees with FlopCounterMode at batch 1"


@pytest.mark.parametrize("name", [n for n in MODELS if model_info(n).family != "static"])
def test_masked_and_sparse_executors_agree_for_hard_decisions(name):
    size, _ = _setting(name)
    model = _build(name)
    model.force_keep_rate(0.5, seed=3)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(4))
    outs = {}
    with torch.no_grad():
        for executor in ("masked", "sparse"):
            set_executor(model, executor)
            outs[executor] = model(x)
    masked, sparse = outs["masked"], outs["sparse"]
    for field in ("exit_index", "gates"):
        if getattr(masked, field) is not None:
            assert torch.equal(getattr(masked, field), getattr(sparse, field)), field
    if masked.masks is not None:
        assert all(torch.equal(m, s) for m, s in zip(masked.masks, sparse.masks))
    assert torch.equal(masked.macs, sparse.macs)
    torch.testing.assert_close(masked.logits, sparse.logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in MODELS if model_info(n).family != "static"])
def test_set_budget_reaches_a_reachable_target_on_held_out_images(name):
    size, n = _setting(name)
    model = _build(name)
    held_out = torch.randn(n, *size, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="held-out"):
        model.set_budget(1e6)
    model.calibrate(held_out)
    if isinstance(model, MultiExitModel):  # a reachable target: the thresholds of one q of the geometric family
        conf = model._require_calibration()
        target = model.held_out_macs(fit_thresholds(conf, exit_proportions(0.7, model.num_exits), between=True))
        assert model.exit_costs(size)[0] < target < model.exit_costs(size)[-1]
    elif model.knob.choices is not None:  # a discrete knob (a budget choice): a target one choice reaches
        target = model.held_out_macs(model.knob.choices[len(model.knob.choices) // 2])
    else:
        low, high = model.held_out_macs(model.knob.low), model.held_out_macs(model.knob.high)
        low, high = min(low, high), max(low, high)
        assert low < high, f"{name}: its knob does not move its cost on these images"
        target = 0.5 * (low + high)
    reached = model.set_budget(target)
    assert abs(reached - target) <= 0.03 * target, f"{name}: reached {reached:.4g} for {target:.4g}"
    set_executor(model, "sparse")
    with torch.no_grad():
        measured = torch.cat([model(c).macs for c in held_out.split(16)]).mean().item()
    assert measured == pytest.approx(reached, rel=1e-9)  # the knob stays where the budget put it


@pytest.mark.parametrize("name", MODELS)
def test_measuring_the_ledger_never_leaks_into_a_users_counter_or_hooks(name):
    from torch.utils.flop_counter import FlopCounterMode

    size, _ = _setting(name)
    model = _build(name)  # fresh: no ledger measured yet
    calls = []
    for m in model.modules():
        m.register_forward_hook(lambda mod, *_: calls.append(type(mod).__name__))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(6))
    counts = []
    for _ in range(2):  # the first forward measures the ledger, the second reads it
        calls.clear()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        counts.append((counter.get_total_flops(), sorted(calls)))
    assert counts[0] == counts[1], f"{name}: measuring its ledger was seen by the user's counter or hooks"


@pytest.mark.parametrize("name", ["resnet20_cifar", "msdnet_cifar_budgeted", "skipnet_resnet38_cifar",
                                  "blockdrop_resnet32_cifar", "sact_resnet32_cifar", "act_resnet32_cifar"])
@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_a_non_finite_input_is_one_clear_error_in_every_executor(name, executor):
    model = _build(name)
    if isinstance(model, DynamicModel):
        set_executor(model, executor)
    x = torch.randn(3, 3, 32, 32)
    x[1, 0, 4, 4] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match=r"non-finite pixels .* samples \[1\]"):
        model(x)


@pytest.mark.parametrize("name", [n for n in MODELS if model_info(n).family != "static"])
def test_forced_decisions_are_a_pure_function_of_seed_and_sample(name):
    size, _ = _setting(name)
    model = _build(name)
    set_executor(model, "sparse")
    model.force_keep_rate(0.5, seed=7)
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(8))
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        first, again, shuffled = model(x), model(x), model(x[order])
        set_executor(model, "masked")
        masked = model(x)
    for field in ("exit_index", "gates"):
        if getattr(first, field) is not None:
            assert torch.equal(getattr(first, field), getattr(again, field))  # nothing advances between calls
            assert torch.equal(getattr(first, field)[order], getattr(shuffled, field))  # per sample, any batch
            assert torch.equal(getattr(first, field), getattr(masked, field))  # and any executor
    if first.masks is not None:
        for a, b, c in zip(first.masks, shuffled.masks, masked.masks):
            assert torch.equal(a[order], b) and torch.equal(a, c)
    assert torch.equal(first.macs[order], shuffled.macs)


@pytest.mark.parametrize("name", ["resnet20_cifar", "msdnet_cifar_budgeted", "ranet_cifar_c1", "skipnet_resnet38_cifar",
                                  "blockdrop_resnet32_cifar", "aig_resnet32_cifar", "rdinet_resnet32_cifar",
                                  "sact_resnet32_cifar", "dynconv_multi_resnet20_cifar"])
def test_a_used_model_pickles_and_deep_copies_to_the_same_answers(name):
    """``torch.save(model)`` and ``copy.deepcopy`` work on a model that has run (ledgers, plans and caches
    built), and the copy gives the same logits and per-sample MACs."""
    import copy
    import io

    model = _build(name)
    if isinstance(model, DynamicModel):
        set_executor(model, "sparse")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x[:1]), model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for copied in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
            for a, b in zip(before, (copied(x[:1]), copied(x))):
                torch.testing.assert_close(_logits(b), _logits(a))
                if isinstance(a, DynamicOutput):
                    assert torch.equal(a.macs, b.macs)


def _logits(out) -> torch.Tensor:
    return out.logits if isinstance(out, DynamicOutput) else out
