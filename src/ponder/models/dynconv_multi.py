"""Budget-aware multi-target spatial inference (Zampokas, Bouganis & Tzovaras, BMVC 2024): one network,
several compute budgets.

A DynConv ResNet (:mod:`ponder.models.dynconv`) whose convolution weights serve every budget (default
``{0.3, 0.5, 0.7}`` of the conditional MACs): per budget each block has its own mask unit and its own
branch BatchNorms (``bn1``, ``bn2``[, ``bn3``]: :class:`~ponder.nn.budget_norms.BudgetNorms`; with
``share_affine`` the budgets share the affine parameters and keep their own running statistics, as the
official code does when starting from a pre-trained dense network). The budget in use is the native knob:
``set_knob(0.5)`` selects the budget 0.5 and ``set_knob(i)`` budget ``i`` (an index into ``budgets``);
``set_budget(macs)`` (after ``calibrate``) the budget whose held-out mean MACs are nearest. The
``multi_target`` method (:mod:`ponder.methods.multi_target`) trains it round-robin.

The state dict is the ResNet's without its branch BatchNorms, plus ``mask_units.<budget>.<block>.*`` and
``norms.sets.<budget>.<block>.<bn1|bn2|bn3>.*``; a dense ResNet's checkpoint (``train.init_from``) loads
its branch BatchNorms into every budget.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn

from ponder.cost import count_params
from ponder.models.base import Knob
from ponder.models.dynconv import DynConvMixin, register_resnet_variant
from ponder.models.resnet import BasicBlock, Bottleneck, CifarResNet, ImageNetResNet, Shortcut
from ponder.nn.budget_norms import BudgetNorms

DEFAULT_BUDGETS = (0.3, 0.5, 0.7)


class MultiBudgetMixin(DynConvMixin):
    """One DynConv network with a mask unit and branch BatchNorms per budget; the knob picks the budget."""

    paper = "Zampokas et al., BMVC 2024 (budget-aware multi-target)"
    knob = Knob("budget", DEFAULT_BUDGETS[0], DEFAULT_BUDGETS[-1], DEFAULT_BUDGETS[1], macs_rise=True,
                doc="the budget in use, by its fraction (e.g. 0.5; set_knob also takes its index, an int)",
                choices=DEFAULT_BUDGETS)
    norms: BudgetNorms

    def _init_multi(self, budgets: Sequence[float], share_affine: bool) -> None:
        self._init_dynconv(budgets)
        n = len(self.budgets)
        path = {id(m): name for name, m in self.named_modules()}
        self.norms = BudgetNorms(self.blocks, [path[id(b)] for b in self.blocks], n, share_affine)
        self.knob = Knob("budget", self.budgets[0], self.budgets[-1], self.budgets[n // 2], macs_rise=True,
                         doc=type(self).knob.doc, choices=self.budgets)
        self._register_load_state_dict_pre_hook(_dense_keys, with_module=True)
        self.select_budget(n // 2)

    def select_budget(self, index: int) -> None:
        """Use budget ``budgets[index]``: its mask units and BatchNorms."""
        self.norms.install(index)
        self.budget_index = index

    def get_knob(self) -> float:
        """The budget in use (its fraction)."""
        return self.budgets[self.budget_index]

    def set_knob(self, value: Any) -> None:
        """Select a budget by its fraction (a float, one of ``budgets``) or by its index (an int)."""
        n = len(self.budgets)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            self.select_budget(value)
            return
        if isinstance(value, float):
            for i, b in enumerate(self.budgets):
                if abs(b - value) < 1e-9:
                    self.select_budget(i)
                    return
        raise ValueError(f"{type(self).__name__}'s native knob is a budget: an index in [0, {n - 1}] or one of "
                         f"the fractions {list(self.budgets)}, got {value!r}")

    def profile_budgets(self, input_size: tuple[int, int, int]) -> list[dict[str, Any]]:
        """Per budget: ``budget`` (the fraction), ``params`` (the parameters one budget's network uses: the shared
        ones, its mask units and its BatchNorms), ``macs`` (nominal: the unconditional MACs plus the budget times
        the conditional ones; dilation makes measured MACs somewhat higher) and ``base_params`` (the dense ResNet's:
        what the multi-target model adds is ``count_params(model) / base_params - 1``)."""
        uncond, cond = self.conditional_macs(input_size)
        total = count_params(self)
        extra = [self._budget_parameters(k) for k in range(len(self.budgets))]
        shared = {id(p) for p in self.norms.sets[0].parameters()}  # the base network's BatchNorm parameters
        everything = {id(p): p for ps in extra for p in ps}
        base = total - sum(p.numel() for i, p in everything.items() if i not in shared)
        rows = []
        for k, b in enumerate(self.budgets):
            own = {id(p) for p in extra[k]}
            unused = sum(p.numel() for i, p in everything.items() if i not in own)
            rows.append({"budget": b, "params": total - unused, "macs": int(round(uncond + b * cond)),
                         "base_params": base})
        return rows

    def _budget_parameters(self, k: int) -> list[nn.Parameter]:
        """Budget ``k``'s own parameters: its mask units and BatchNorms (affine parameters shared or not)."""
        return list(self.mask_units[k].parameters()) + list(self.norms.sets[k].parameters())


def _dense_keys(model: MultiBudgetMixin, state: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a dense ResNet's branch BatchNorm keys go to every budget."""
    model.norms.dense_keys_hook(prefix, state)


class MultiBudgetCifarResNet(MultiBudgetMixin, CifarResNet):
    """CIFAR ResNet (6n+2, BasicBlocks, 1x1-conv projection shortcuts by default) serving several budgets."""

    def __init__(self, depth: int = 32, num_classes: int = 10, budgets: Sequence[float] = DEFAULT_BUDGETS,
                 share_affine: bool = False, shortcut: Shortcut = "B", **kw) -> None:
        CifarResNet.__init__(self, depth, num_classes=num_classes, shortcut=shortcut, **kw)
        self._init_multi(budgets, share_affine)


class MultiBudgetImageNetResNet(MultiBudgetMixin, ImageNetResNet):
    """torchvision-layout ResNet serving several budgets (affine BatchNorm parameters shared by default:
    the official recipe starts from a pre-trained dense network)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 budgets: Sequence[float] = DEFAULT_BUDGETS, share_affine: bool = True, **kw) -> None:
        ImageNetResNet.__init__(self, block, layers, num_classes=num_classes, **kw)
        self._init_multi(budgets, share_affine)


_CIFAR_DOC = ("Budget-aware multi-target CIFAR ResNet-{depth} (DynConv masks and BatchNorms per budget, shared convs; "
              "options budgets, default [0.3, 0.5, 0.7], and share_affine).")
_IMAGENET_DOC = ("Budget-aware multi-target ResNet-{depth} (torchvision layout; options budgets, default [0.3, 0.5, 0.7], "
                 "and share_affine, default true).")

dynconv_multi_resnet20_cifar = register_resnet_variant("dynconv_multi", MultiBudgetCifarResNet, 20, _CIFAR_DOC)
dynconv_multi_resnet32_cifar = register_resnet_variant("dynconv_multi", MultiBudgetCifarResNet, 32, _CIFAR_DOC)
dynconv_multi_resnet18 = register_resnet_variant("dynconv_multi", MultiBudgetImageNetResNet, 18, _IMAGENET_DOC)
dynconv_multi_resnet50 = register_resnet_variant("dynconv_multi", MultiBudgetImageNetResNet, 50, _IMAGENET_DOC)
dynconv_multi_resnet101 = register_resnet_variant("dynconv_multi", MultiBudgetImageNetResNet, 101, _IMAGENET_DOC)
