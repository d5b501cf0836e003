"""ucbdrive/skipnet (``cifar/``) checkpoints -> ponder ``skipnet_resnet{38,74,110}_cifar``.

The file (``train_sp.py`` / ``train_rl.py``): ``{'iter', 'arch', 'state_dict', 'best_prec1'}``, keys
prefixed ``module.``. Official -> ponder (``n`` blocks per group, block ``j = (g - 1) * n + i``):

- ``conv1``, ``bn1``, ``fc`` -> ``backbone.*``; ``group{g}_layer{i}.*`` -> ``backbone.layer{g}.{i}.*``
  (the projection shortcut ``downsample.{0,1}`` keeps its name);
- ``group{g}_ds{i}.*`` is the same projection registered a second time (the same tensors): checked
  equal to ``group{g}_layer{i}.downsample.*`` and dropped;
- gate ``group{g}_gate{i}`` reads block ``j``'s output and decides block ``j + 1``: ponder's gate ``j``.
  The last one (after the last block) is dropped: the official forward discards its output.
  Recurrent gate: ``group{g}_gate{i}.1`` (the 1x1 embedding after the average pool) ->
  ``gate_bank.proj.j``; ``control.rnn.{weight,bias}_{ih,hh}_l0`` (``nn.LSTM``) ->
  ``gate_bank.lstm.*`` (``nn.LSTMCell``, the same gate arithmetic); ``control.proj`` -> ``gate_bank.out``.
  Feed-forward gates (FFGate-I: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``linear_layer``; FFGate-II:
  ``conv1``, ``bn1``, ``linear_layer``) -> ``gate_bank.gates.j.body.*`` / ``.out``.

Options: the depth (blocks per group), ``num_classes`` (``fc``), the gate type (the gate tensors).
Preprocessing: SkipNet's CIFAR mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ponder.official.layout import (Mapped, OfficialCheckpointError, cifar_dataset, find_state_dict, indices,
                                    plain_values)

REPOSITORY = "ucbdrive/skipnet"
MODELS = "skipnet_resnet*_cifar"  # (the ImageNet SkipNets have no official checkpoint mapping)
DEPTHS = (38, 74, 110)
NORMALIZE = [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]]
RNN_DIMS = 10  # ponder's RecurrentGates: projection and LSTM width 10, as every official factory
_FF_PARTS = {
    "ffgate1": {"conv1": "body.1.0", "bn1": "body.1.1", "conv2": "body.2.0", "bn2": "body.2.1", "linear_layer": "out"},
    "ffgate2": {"conv1": "body.0", "bn1": "body.1", "linear_layer": "out"},
}


def matches(obj: Any) -> bool:
    """A SkipNet state dict: ``group1_layer0.*`` keys."""
    state = find_state_dict(obj)
    return state is not None and any(k.startswith("group1_layer0.") for k in state)


def gate_type(state: dict[str, Tensor]) -> str:
    """``"rnn"``, ``"ffgate1"`` or ``"ffgate2"`` from the gate tensors."""
    if "control.rnn.weight_ih_l0" in state:
        return "rnn"
    if "group1_gate0.conv2.weight" in state:
        return "ffgate1"
    if "group1_gate0.conv1.weight" in state:
        return "ffgate2"
    raise OfficialCheckpointError("the SkipNet checkpoint has no gates (neither control.rnn nor group1_gate0.conv1): "
                                  "a plain ResNet of train_base.py; convert it as a resnet*_cifar with shortcut B")


def map_checkpoint(obj: Any, name: str | None, kwargs: dict[str, Any]) -> Mapped:
    official = find_state_dict(obj)
    assert official is not None  # matches() checked it
    n = len(indices(official, r"group1_layer(\d+)\."))
    depth, gates = 6 * n + 2, gate_type(official)
    if depth not in DEPTHS:
        raise OfficialCheckpointError(f"the SkipNet checkpoint is a ResNet-{depth}; ponder has SkipNet on CIFAR "
                                      f"ResNet-38, -74 and -110")
    if gates == "rnn" and tuple(official["control.rnn.weight_hh_l0"].shape) != (4 * RNN_DIMS, RNN_DIMS):
        hidden = official["control.rnn.weight_hh_l0"].shape[1]
        raise OfficialCheckpointError(f"the SkipNet LSTM gate has hidden size {hidden}; ponder's recurrent gate has "
                                      f"the official 10 (embed_dim = hidden_dim = 10)")
    state: dict[str, Tensor] = {}
    duplicates = 0
    for key, value in official.items():
        if m := re.match(r"group(\d+)_ds(\d+)\.(.+)", key):
            twin = official.get(f"group{m[1]}_layer{m[2]}.downsample.{m[3]}")
            if twin is None or not torch.equal(twin, value):
                raise OfficialCheckpointError(f"the SkipNet checkpoint's {key} differs from its block's own shortcut "
                                              f"(group{m[1]}_layer{m[2]}.downsample); the file is inconsistent")
            duplicates += 1
        elif m := re.match(r"group(\d+)_layer(\d+)\.(.+)", key):
            state[f"backbone.layer{m[1]}.{m[2]}.{m[3]}"] = value
        elif m := re.match(r"group(\d+)_gate(\d+)\.(\w+)\.(.+)", key):
            j = (int(m[1]) - 1) * n + int(m[2])
            if j == 3 * n - 1:
                continue  # the gate after the last block: its output is discarded
            part = "proj" if gates == "rnn" and m[3] == "1" else _FF_PARTS.get(gates, {}).get(m[3])
            if part is None:
                raise OfficialCheckpointError(f"the SkipNet checkpoint has an unknown {gates} gate entry {key}")
            state[f"gate_bank.proj.{j}.{m[4]}" if gates == "rnn" else f"gate_bank.gates.{j}.{part}.{m[4]}"] = value
        elif m := re.match(r"control\.rnn\.(\w+)_l0$", key):
            state[f"gate_bank.lstm.{m[1]}"] = value
        elif key.startswith("control.proj."):
            state["gate_bank.out." + key[len("control.proj."):]] = value
        else:
            state["backbone." + key] = value
    num_classes = int(official["fc.weight"].shape[0])
    notes = ["the gate after the last block is dropped: the official forward discards its output"]
    if duplicates:
        notes.append(f"{duplicates} duplicated shortcut entries (group*_ds*, the same tensors as the blocks' "
                     f"downsample) are recognised and dropped")
    dataset = cifar_dataset(num_classes, notes)
    return Mapped(REPOSITORY, name or f"skipnet_resnet{depth}_cifar",
                  {"num_classes": num_classes, "gate_type": gates, **kwargs}, state, dataset, NORMALIZE, notes,
                  plain_values(obj, ("iter", "arch", "best_prec1")))
