"""Mamba ops: CUDA kernels when importable on GPU, pure-PyTorch paths otherwise."""

from fairseq_mamba.ops.causal_conv1d import (
    HAS_CUDA_CONV,
    causal_conv1d,
    causal_conv1d_fn,
    causal_conv1d_reference,
)
from fairseq_mamba.ops.dispatch import NO_KERNELS, Kernels, kernel_for, use_kernels
from fairseq_mamba.ops.selective_scan import (
    HAS_CUDA_SCAN,
    mamba_inner_fn,
    selective_scan,
    selective_scan_fn,
    selective_scan_reference,
)

__all__ = [
    "HAS_CUDA_CONV",
    "HAS_CUDA_SCAN",
    "Kernels",
    "NO_KERNELS",
    "causal_conv1d",
    "causal_conv1d_fn",
    "causal_conv1d_reference",
    "kernel_for",
    "mamba_inner_fn",
    "selective_scan",
    "selective_scan_fn",
    "selective_scan_reference",
    "use_kernels",
]
