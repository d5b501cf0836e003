"""yangle15/RANet-pytorch checkpoints -> ponder ``ranet_*``.

The file (``main.py``, as MSDNet's): ``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}``,
keys prefixed ``module.``. Official module -> ponder module:

- ``FirstLayer.layers.i`` -> ``stem.layers.i``; ``classifier.k`` -> ``heads.k`` (same exit order);
- ``scale_flows.i.k`` -> ``flows.i.k``, inside it ``conv_last`` -> ``last`` and ``trans`` -> ``trans``;
- a layer's ``conv_normal.net.n`` (one Sequential: 1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU) ->
  ``<unit>.(n // 3).net.(n % 3)`` (ponder: two ConvBasic), where ``<unit>`` is nothing in a normal
  block and ``fine`` in a fusion block, whose ``conv_up`` (from the coarser flow) becomes ``coarse``.
  A fusion block is one with ``conv_up`` / ``conv_last`` entries.

Options: ``num_classes`` from the last classifier; the configuration is the first of ponder's
presets (Model-C-1, Model-C-2, CIFAR anytime, ImageNet, ImageNet with 64 channels) whose tensors
have the file's keys and shapes.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ponder.official.layout import (Mapped, OfficialCheckpointError, cifar_dataset, find_state_dict, fits, indices,
                                    plain_values)
from ponder.official.msdnet import CIFAR_NORMALIZE

REPOSITORY = "yangle15/RANet-pytorch"
MODELS = "ranet_*"
CIFAR_PRESETS: list[tuple[str, dict[str, Any]]] = [("ranet_cifar_c1", {}), ("ranet_cifar_c2", {}),
                                                   ("ranet_cifar_anytime", {})]
IMAGENET_PRESETS: list[tuple[str, dict[str, Any]]] = [("ranet_imagenet", {}), ("ranet_imagenet", {"n_channels": 64})]

_PREFIXES = {"FirstLayer": "stem", "classifier": "heads", "scale_flows": "flows"}
_UNIT = re.compile(r"flows\.(\d+)\.(\d+)\.layers\.(\d+)\.(conv_normal|conv_up)\.net\.(\d+)\.(.+)")


def matches(obj: Any) -> bool:
    """A RANet state dict: ``scale_flows.*`` and ``FirstLayer.*`` keys."""
    state = find_state_dict(obj)
    return state is not None and any(k.startswith("scale_flows.") for k in state) \
        and any(k.startswith("FirstLayer.") for k in state)


def ponder_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official state dict (no ``module.`` prefix) under ponder's RANet keys (module docstring)."""
    fusion = {tuple(map(int, m.groups())) for k in state
              if (m := re.match(r"scale_flows\.(\d+)\.(\d+)\.(?:layers\.\d+\.conv_up|conv_last)\.", k))}
    out = {}
    for key, value in state.items():
        head, _, tail = key.partition(".")
        k = f"{_PREFIXES.get(head, head)}.{tail}".replace(".conv_last.", ".last.")
        m = _UNIT.match(k)
        if m:
            flow, block, layer, part, n, rest = m.groups()
            unit = {"conv_up": "coarse.", "conv_normal": "fine."}[part] if (int(flow), int(block)) in fusion else ""
            k = f"flows.{flow}.{block}.layers.{layer}.{unit}{int(n) // 3}.net.{int(n) % 3}.{rest}"
        out[k] = value
    return out


def map_checkpoint(obj: Any, name: str | None, kwargs: dict[str, Any]) -> Mapped:
    official = find_state_dict(obj)
    assert official is not None  # matches() checked it
    state = ponder_keys(official)
    heads = indices(state, r"heads\.(\d+)\.linear\.weight")
    num_classes = int(state[f"heads.{heads[-1]}.linear.weight"].shape[0])
    imagenet = "stem.layers.0.0.weight" in state  # 7x7 conv + BN + ReLU + max-pool
    presets = IMAGENET_PRESETS if imagenet else CIFAR_PRESETS
    if name is not None:
        presets = [(name, {})]
    chosen = next(((n, {"num_classes": num_classes, **kw, **kwargs}) for n, kw in presets
                   if fits(state, n, {"num_classes": num_classes, **kw, **kwargs})), None)
    if chosen is None:
        tried = ", ".join(n + (f" {kw}" if kw else "") for n, kw in presets)
        flows = len(indices(official, r"scale_flows\.(\d+)\."))
        raise OfficialCheckpointError(
            f"the RANet checkpoint ({len(heads)} exits, {flows} scale flows) fits none of {tried}; name the model "
            f"and its options, e.g. ponder convert PATH --to DIR --model ranet_cifar_c1 --model-arg step=4 "
            f"--model-arg stepmode=even")
    notes: list[str] = []
    dataset = "imagefolder" if imagenet else cifar_dataset(num_classes, notes)
    if "optimizer" in obj:
        notes.append("the optimizer state is not converted (not needed for inference)")
    return Mapped(REPOSITORY, chosen[0], chosen[1], state, dataset,
                  None if imagenet else CIFAR_NORMALIZE.get(num_classes), notes,
                  plain_values(obj, ("epoch", "arch", "best_prec1")))
