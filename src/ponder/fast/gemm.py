"""Row GEMMs ``act(rows @ W^T + b)`` on the faster of two CPU backends (inference only).

PyTorch's ``addmm`` runs on the BLAS it was built with (MKL). On some CPUs that is far from the
best fp32 GEMM available: on this project's AMD EPYC (AVX-512) MKL takes its AVX2 path and
reaches about 55 GMAC/s on one thread, while oneDNN's inner product (the kernel behind
PyTorch's CPU convolutions, reachable on plain tensors as ``torch.ops.mkldnn._linear_pointwise``)
reaches 110-120 GMAC/s on the same shapes. :func:`linear_rows` uses oneDNN where it is available
and measured faster on this machine (:func:`gemm_backend`, timed once per thread count), for
GEMMs of at least :data:`ONEDNN_MIN_MACS` (below that oneDNN's ~10 us call overhead loses), and
``addmm`` otherwise. Both compute in fp32; results agree to rounding.

The sparse kernels (:mod:`ponder.nn.sparse_conv`) run every GEMM through here. With fast paths off
(:func:`ponder.fast.enabled`) every GEMM is ``addmm``. PyTorch's dense
1x1 convolutions do not (they stay on PyTorch's own kernels), which is why ``ponder bench``
reports the dense network both as PyTorch runs it and with these kernels (README, "Speed").
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ponder.fast.routes import choose
from ponder.fast.switch import enabled

#: GEMMs with fewer MACs than this use ``addmm`` (measured crossover ~0.5-1M MACs, one thread).
ONEDNN_MIN_MACS = 1 << 20

_FORCED: list[str | None] = [None]
BACKENDS = ("auto", "onednn", "blas")


def onednn_available() -> bool:
    """Whether this PyTorch build exposes oneDNN's inner product on plain tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._linear_pointwise`` (``2 * n * K * N``), so ``FlopCounterMode`` counts the oneDNN route."""
    n = 1
    for d in x_shape[:-1]:
        n *= d
    return 2 * n * x_shape[-1] * w_shape[0]


if onednn_available():
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_pointwise_flops)


def set_gemm_backend(name: str) -> None:
    """``"auto"`` (default: the faster one, measured), ``"onednn"`` or ``"blas"`` (``addmm``) for :func:`linear_rows`."""
    if name not in BACKENDS:
        raise ValueError(f"GEMM backend must be one of {BACKENDS}, got {name!r}")
    if name == "onednn" and not onednn_available():
        raise ValueError("this PyTorch build has no oneDNN inner product (torch.ops.mkldnn._linear_pointwise)")
    _FORCED[0] = None if name == "auto" else name


def gemm_backend() -> str:
    """The backend :func:`linear_rows` uses for large CPU GEMMs: ``"onednn"`` or ``"blas"``.

    ``"auto"`` takes the faster on a ``[1024, 1152] x [1152, 128]`` GEMM, timed once per machine and
    thread count (a stored route: :mod:`ponder.fast.routes`).
    """
    if _FORCED[0] is not None:
        return _FORCED[0]
    if not onednn_available():
        return "blas"
    return choose("gemm_backend", (torch.get_num_threads(),), _backend_routes)


def _backend_routes() -> list[tuple[str, object]]:
    operands: list[Tensor] = []  # made on the first timed call (listing the routes allocates nothing)

    def args() -> list[Tensor]:
        if not operands:
            g = torch.Generator().manual_seed(0)
            operands.extend((torch.randn(1024, 1152, generator=g), torch.randn(128, 1152, generator=g),
                             torch.randn(128, generator=g)))
        return operands

    return [("blas", lambda: torch.addmm(args()[2], args()[0], args()[1].t())),  # ties: blas
            ("onednn", lambda: torch.ops.mkldnn._linear_pointwise(*args(), "none", [], ""))]


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False) -> Tensor:
    """``act(x @ weight^T + bias)``: ``x [n, K]`` (contiguous rows), ``weight [N, K]``, ``bias [N]`` -> ``[n, N]``.

    ``act`` is ReLU when ``relu``. The oneDNN route has no autograd formula, so inputs that need a
    gradient always take ``addmm``.
    """
    n, k = x.shape
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if (not needs_grad and enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and n * k * weight.shape[0] >= ONEDNN_MIN_MACS and gemm_backend() == "onednn"):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none",
                                                   [None] if relu else [], "")
    y = torch.addmm(bias, x, weight.t())
    return y.relu_() if relu else y
