"""Which implementation an op call takes: a CUDA kernel of mamba-ssm / causal-conv1d, or PyTorch.

The kernels are try-imported here, once, and set to None where they cannot run (a CPU-only
install imports but has no compiled extension). :func:`kernel_for` is the one place that decides,
per call, from the input's device and dtype, the kernels at hand and the call's arguments.

Tests and benchmarks choose the kernels explicitly with :func:`use_kernels`: ``Kernels(...)``
with CPU stand-ins (the packages' pure-PyTorch references) and ``device_type="cpu"`` runs every
kernel call site on a CPU; ``NO_KERNELS`` forces the PyTorch path on a GPU.
"""
import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

try:
    from mamba_ssm.ops import selective_scan_interface as _ssi

    # A CPU-only install imports fine but has no compiled kernel behind the API.
    if _ssi.selective_scan_cuda is None:
        raise ImportError("mamba_ssm was installed without its selective_scan_cuda extension")
    selective_scan_fn, mamba_inner_fn = _ssi.selective_scan_fn, _ssi.mamba_inner_fn
except Exception as exc:  # ImportError, or missing triton / CUDA / ABI errors
    logger.debug("mamba_ssm selective_scan CUDA kernel unavailable: %r", exc)
    selective_scan_fn = None
    mamba_inner_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except Exception as exc:  # ImportError, or CUDA/ABI errors of a CPU-only install
    logger.debug("causal_conv1d CUDA kernel unavailable: %r", exc)
    causal_conv1d_fn = None

try:  # Mamba-2's SSD scan: a triton kernel (so a GPU and triton are needed to import it)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception as exc:  # ImportError (no triton on CPU installs), or CUDA errors
    logger.debug("mamba_ssm mamba_chunk_scan_combined kernel unavailable: %r", exc)
    mamba_chunk_scan_combined = None

HAS_CUDA_SCAN = selective_scan_fn is not None
HAS_CUDA_CONV = causal_conv1d_fn is not None

# The input dtypes both kernels are compiled for (no fp64).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernels:
    """The kernel callables, with the upstream packages' APIs, and where they run."""

    selective_scan_fn: Optional[Callable] = None  # mamba_ssm...selective_scan_fn
    mamba_inner_fn: Optional[Callable] = None  # mamba_ssm...mamba_inner_fn (needs causal_conv1d)
    causal_conv1d_fn: Optional[Callable] = None  # causal_conv1d.causal_conv1d_fn
    device_type: str = "cuda"
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES
    # last, so that positional Kernels(scan, inner, conv, device_type, dtypes) calls keep working
    mamba_chunk_scan_combined: Optional[Callable] = None  # mamba_ssm...ssd_combined (Mamba-2)


INSTALLED = Kernels(selective_scan_fn, mamba_inner_fn, causal_conv1d_fn,
                    mamba_chunk_scan_combined=mamba_chunk_scan_combined)
NO_KERNELS = Kernels()
_ACTIVE = contextvars.ContextVar("fairseq_mamba_kernels", default=INSTALLED)
OPS = ("selective_scan", "causal_conv1d", "mamba_inner", "ssd_scan")


@contextlib.contextmanager
def use_kernels(kernels: Kernels):
    """Within the block, every op call dispatches with ``kernels`` instead of the installed ones."""
    token = _ACTIVE.set(kernels)
    try:
        yield kernels
    finally:
        _ACTIVE.reset(token)


def kernel_for(op: str, x: torch.Tensor, stateful: bool = False, conv_width: int = 4):
    """The kernel callable one call of ``op`` takes for input ``x``, or None for the PyTorch path.

    op: "selective_scan" (x = u), "causal_conv1d" (x = the conv input, width ``conv_width``) or
    "mamba_inner" (x = xz, the fused one-direction conv + scan + out_proj) or "ssd_scan"
    (x = Mamba-2's x; its kernel takes initial and final states, so any call may take it).
    stateful: the call passes a state the kernel API cannot take (an initial scan state: mamba-ssm's
    selective_scan_fn has none; conv initial/final states, which causal_conv1d_fn only takes
    channel-last, for the PyTorch path is exact anyway).
    """
    if op not in OPS:
        raise ValueError(f"op={op!r}; choose one of {OPS}")
    kernels = _ACTIVE.get()
    if x.device.type != kernels.device_type or x.dtype not in kernels.dtypes or stateful:
        return None
    if op == "selective_scan":
        return kernels.selective_scan_fn
    if op == "ssd_scan":
        return kernels.mamba_chunk_scan_combined
    if op == "causal_conv1d":
        # The kernel is compiled for widths 2..4 only.
        return kernels.causal_conv1d_fn if 2 <= conv_width <= 4 else None
    # mamba_inner_fn runs causal_conv1d's CUDA extension inside: without it, it asserts.
    return kernels.mamba_inner_fn if kernels.causal_conv1d_fn is not None else None
