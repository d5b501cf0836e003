"""Tushar-N/blockdrop checkpoints -> ponder ``blockdrop_resnet{32,110}_cifar`` / ``blockdrop_resnet101``.

The file (``finetune.py``): ``{'agent', 'resnet', 'epoch', 'reward', 'acc'}``, two plain state dicts
(``.module.state_dict()``: no prefix). Older files name the policy ``'net'`` and may hold
``features.fc.*`` entries, which the official loader drops too.

- ``resnet`` (a "flat" ResNet): ``conv1``, ``bn1``, ``fc`` -> ``backbone.*``;
  ``blocks.s.b.*`` -> ``backbone.layer{s+1}.b.*``; ImageNet's projection shortcuts
  ``ds.s.*`` -> ``backbone.layer{s+1}.0.downsample.*`` (the CIFAR shortcut, a 2x2 average pool with
  zero channels appended, has no tensors: ponder's ``shortcut="avgpool"``).
- ``agent``: the trunk ``features.*`` (a ResNet-8 / ResNet-10 without fc) -> ``policy.trunk.*`` with
  the same renaming; ``logit`` -> ``policy.fc``; the value head ``vnet`` is dropped (no loss or
  decision uses it at test time).

Options: the depth (blocks per stage), ``num_classes`` (``fc``). Preprocessing: the ResNet-32
CIFAR-10 checkpoints expect mean/std normalised inputs, every other CIFAR one raw [0, 1] pixels
(reference block_skipping.md 1.4); ``data.normalize`` is set to match.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ponder.official.layout import (Mapped, OfficialCheckpointError, cifar_dataset, indices, plain_values,
                                    strip_module, tensor_dict)

REPOSITORY = "Tushar-N/blockdrop"
MODELS = "blockdrop_resnet*"
CIFAR_DEPTHS = (32, 110)
IMAGENET_LAYERS = {(3, 4, 23, 3): "blockdrop_resnet101"}
R32_C10_NORMALIZE = [[125.3 / 255, 123.0 / 255, 113.9 / 255], [63.0 / 255, 62.1 / 255, 66.7 / 255]]
RAW = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def matches(obj: Any) -> bool:
    """A BlockDrop checkpoint: a dict with a ``resnet`` and / or ``agent`` (``net``) state dict."""
    return isinstance(obj, Mapping) and any(tensor_dict(obj.get(k)) is not None for k in ("resnet", "agent", "net"))


def flat_resnet_keys(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A flat ResNet's keys (``blocks.s.b.*``, ``ds.s.*``, stem, fc) under ponder's ResNet keys + ``prefix``."""
    out = {}
    for key, value in state.items():
        if m := re.match(r"blocks\.(\d+)\.(\d+)\.(.+)", key):
            key = f"layer{int(m[1]) + 1}.{m[2]}.{m[3]}"
        elif m := re.match(r"ds\.(\d+)\.(.+)", key):
            key = f"layer{int(m[1]) + 1}.0.downsample.{m[2]}"
        out[prefix + key] = value
    return out


def map_checkpoint(obj: Any, name: str | None, kwargs: dict[str, Any]) -> Mapped:
    resnet = tensor_dict(obj.get("resnet"))
    agent_key = "agent" if tensor_dict(obj.get("agent")) is not None else "net"
    agent = tensor_dict(obj.get(agent_key))
    if resnet is None or agent is None:
        raise OfficialCheckpointError(
            f"this BlockDrop checkpoint holds only the {'policy' if resnet is None else 'ResNet'} "
            f"({'agent' if resnet is None else 'resnet'}); ponder needs both, as the finetuned checkpoints "
            f"(ckpt_E_*.t7 written by finetune.py) hold them; curriculum checkpoints lack the ResNet")
    resnet, agent = strip_module(resnet), strip_module(agent)
    notes = ["the policy's value head (vnet) is dropped: it is unused at test time"]
    stray = [k for k in agent if k.startswith("features.fc")]
    if stray:
        notes.append(f"{len(stray)} stale features.fc entries of the policy are dropped, as the official loader does")
    state = flat_resnet_keys(resnet, "backbone.")
    trunk = {k[len("features."):]: v for k, v in agent.items() if k.startswith("features.") and k not in stray}
    state.update(flat_resnet_keys(trunk, "policy.trunk."))
    state.update({"policy.fc." + k[len("logit."):]: v for k, v in agent.items() if k.startswith("logit.")})
    stages = indices(resnet, r"blocks\.(\d+)\.")
    layers = tuple(len(indices(resnet, rf"blocks\.{s}\.(\d+)\.")) for s in stages)
    num_classes = int(resnet["fc.weight"].shape[0])
    imagenet = resnet["conv1.weight"].shape[-1] == 7
    if imagenet:
        inferred = IMAGENET_LAYERS.get(layers)
        if inferred is None:
            raise OfficialCheckpointError(f"the BlockDrop ImageNet ResNet has {list(layers)} blocks per stage; ponder "
                                          f"has BlockDrop on ResNet-101 ([3, 4, 23, 3]) only")
    else:
        depth = 6 * layers[0] + 2
        if depth not in CIFAR_DEPTHS or len(set(layers)) != 1:
            raise OfficialCheckpointError(f"the BlockDrop CIFAR ResNet has {list(layers)} blocks per stage; ponder "
                                          f"has BlockDrop on ResNet-32 ([5, 5, 5]) and ResNet-110 ([18, 18, 18])")
        inferred = f"blockdrop_resnet{depth}_cifar"
    if imagenet:
        dataset, normalize = "imagefolder", None
    else:
        dataset = cifar_dataset(num_classes, notes)
        r32_c10 = inferred == "blockdrop_resnet32_cifar" and num_classes == 10
        normalize = R32_C10_NORMALIZE if r32_c10 else RAW
        notes.append("inputs are normalised as BlockDrop's checkpoint expects: " +
                     ("mean (125.3, 123.0, 113.9) / 255, std (63.0, 62.1, 66.7) / 255" if r32_c10 else
                      "raw [0, 1] pixels (data.normalize)"))
    state["first_decided"] = torch.zeros((), dtype=torch.long)  # the policy decides every block (no curriculum)
    options = {"num_classes": num_classes} if imagenet else {"num_classes": num_classes, "shortcut": "avgpool"}
    return Mapped(REPOSITORY, name or inferred, {**options, **kwargs}, state, dataset,
                  normalize, notes, plain_values(obj, ("epoch", "acc", "reward")))

