"""kalviny/MSDNet-PyTorch checkpoints -> ponder ``msdnet_*``.

The file (``main.py``): ``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}``, the state dict
of a ``DataParallel`` wrapper (every key starts with ``module.``). ponder's MSDNet uses the
official module names, so the keys map one to one once the prefix is gone.

Options read from the tensors: ``num_classes`` (the last classifier), ``n_blocks`` (the number of
classifiers), ``stepmode`` / ``step`` / ``base`` (MSDN layers per block), the stem (3x3 CIFAR or
7x7 ImageNet), ``n_channels`` and ``growth_rate`` (the first layer's width, the first layer's new
channels); grFactor, bnFactor, reduction and prune are the official defaults (checked: a file
that differs does not fit and gets a clear error).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ponder.official.layout import (Mapped, OfficialCheckpointError, cifar_dataset, find_state_dict, indices,
                                    plain_values)

REPOSITORY = "kalviny/MSDNet-PyTorch"
MODELS = "msdnet_*"
# the official CIFAR normalisation (reference early_exit.md section 7); ImageNet: ponder's default = the official one
CIFAR_NORMALIZE = {
    10: [[0.4914, 0.4824, 0.4467], [0.2471, 0.2435, 0.2616]],
    100: [[0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]],
}


def matches(obj: Any) -> bool:
    """An MSDNet state dict: ``blocks.0.0.layers.*`` and ``classifier.<k>.linear.weight`` keys."""
    state = find_state_dict(obj)
    return state is not None and any(k.startswith("blocks.0.0.layers.") for k in state) \
        and any(k.startswith("classifier.") and k.endswith(".linear.weight") for k in state)


def layer_steps(state: dict[str, Tensor], n_blocks: int) -> list[int]:
    """MSDN layers per block: the children of ``blocks.k`` holding ``conv_normal`` / ``conv_down`` units."""
    return [len(indices((k for k in state if ".conv_normal." in k or ".conv_down." in k), rf"blocks\.{b}\.(\d+)\."))
            for b in range(n_blocks)]


def solve_steps(steps: list[int]) -> dict[str, Any]:
    """``stepmode``, ``step``, ``base`` giving these layers per block (``even``: base, step, step, ...;
    ``lin_grow``: base, step + 1, 2 step + 1, ...)."""
    base, rest = steps[0], steps[1:]
    if not rest or all(s == rest[0] for s in rest):
        return {"stepmode": "even", "step": rest[0] if rest else 1, "base": base}
    step = rest[0] - 1
    if step > 0 and all(s == step * i + 1 for i, s in enumerate(rest, start=1)):
        return {"stepmode": "lin_grow", "step": step, "base": base}
    raise OfficialCheckpointError(f"the MSDNet blocks have {steps} layers, which neither stepmode 'even' nor "
                                  f"'lin_grow' gives; the checkpoint is not an MSDNet-PyTorch model")


def map_checkpoint(obj: Any, name: str | None, kwargs: dict[str, Any]) -> Mapped:
    state = find_state_dict(obj)
    assert state is not None  # matches() checked it
    heads = indices(state, r"classifier\.(\d+)\.linear\.weight")
    num_classes = int(state[f"classifier.{heads[-1]}.linear.weight"].shape[0])
    imagenet = "blocks.0.0.layers.0.0.weight" in state  # 7x7 conv + BN + ReLU + max-pool (no ConvBasic)
    first = state["blocks.0.0.layers.0.0.weight" if imagenet else "blocks.0.0.layers.0.net.0.weight"]
    # the first MSDN layer's 3x3 conv at the finest scale adds growth_rate * grFactor[0] (= 1) channels
    growth = next((v for k, v in state.items() if k.startswith("blocks.0.1.layers.0.conv_normal.net.")
                   and v.dim() == 4 and v.shape[-1] == 3), None)
    if growth is None:
        raise OfficialCheckpointError("the MSDNet checkpoint has no 3x3 convolution in its first MSDN layer "
                                      "(blocks.0.1.layers.0.conv_normal); it is not an MSDNet-PyTorch model")
    inferred: dict[str, Any] = {"num_classes": num_classes, "n_blocks": len(heads),
                                **solve_steps(layer_steps(state, len(heads))),
                                "n_channels": int(first.shape[0]), "growth_rate": int(growth.shape[0])}
    if int(first.shape[1]) != 3:
        inferred["in_chans"] = int(first.shape[1])
    if name is None:
        name = (f"msdnet_imagenet_step{inferred['step'] if inferred['step'] in (4, 6, 7) else 4}" if imagenet
                else "msdnet_cifar_budgeted" if inferred["stepmode"] == "lin_grow" else "msdnet_cifar_anytime")
    notes: list[str] = []
    dataset = "imagefolder" if imagenet else cifar_dataset(num_classes, notes)
    if "optimizer" in obj:
        notes.append("the optimizer state is not converted (not needed for inference)")
    return Mapped(REPOSITORY, name, {**inferred, **kwargs}, state, dataset,
                  None if imagenet else CIFAR_NORMALIZE.get(num_classes), notes,
                  plain_values(obj, ("epoch", "arch", "best_prec1")))
