"""Every fast path of ponder behind one door.

What lives here: the compiled C++ kernels (:mod:`~ponder.fast.native`, built ahead of time by
``ponder kernels build``), routes chosen by timing and stored per machine (:mod:`~ponder.fast.routes`),
BatchNorm folded into convolutions and weights packed for oneDNN or blocked for the kernels, cached
with their weights (:mod:`~ponder.fast.fold`, :mod:`~ponder.fast.weight_cache`), exit-head plans, and
whole-model plans checked once per call (:mod:`~ponder.fast.plan`: gated ResNets and SkipNet at
batch 1, SACT's units).
Model and layer code calls the plain operations below and never sees a route.

One switch turns all of it off: ``PONDER_FAST=0`` in the environment, or :func:`set_enabled` /
:func:`disabled`. Off, every operation runs its plain PyTorch reference (no kernels, no timing, no
caches): the same decisions and costs, results equal up to float rounding, only slower.
``ponder kernels`` reports what is built and which route each stored shape takes.
"""

from ponder.fast.conv import conv2d_runner, conv_bn
from ponder.fast.early_exit import applies as exit_head_applies
from ponder.fast.early_exit import exit_head, exit_step, pool_flat
from ponder.fast.fold import FoldedConv, fold_conv_bn, fold_conv_bn_dense, fold_key, fold_linear_bn
from ponder.fast.gemm import linear_rows
from ponder.fast.plan import prepared
from ponder.fast.routes import choose, decide
from ponder.fast.spatial import (act_step, mask_decide, mask_logits, residual_epilogue, sact_step, sact_step_applies,
                                 scatter_residual, spatial_halting, spatial_halting_applies, unit_masks)
from ponder.fast.small_conv import bound_lstm_gate, bound_pooled_mlp, bound_relational_router
from ponder.fast.switch import cpu_inference, disabled, enabled, set_enabled

__all__ = [
    "act_step", "bound_lstm_gate", "bound_pooled_mlp", "bound_relational_router", "choose", "conv2d_runner",
    "conv_bn", "cpu_inference", "decide", "disabled",
    "enabled", "exit_head", "exit_head_applies", "exit_step", "fold_conv_bn", "fold_conv_bn_dense", "fold_key",
    "fold_linear_bn", "FoldedConv", "linear_rows", "mask_decide", "mask_logits", "pool_flat", "prepared",
    "residual_epilogue", "sact_step", "sact_step_applies", "scatter_residual", "set_enabled", "spatial_halting",
    "spatial_halting_applies", "unit_masks",
]
