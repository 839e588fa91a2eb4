"""The compiled CPU causal depthwise conv1d (+ SiLU) (csrc/causal_conv1d_cpu.cpp) and its
autograd Function; ``causal_conv1d`` takes it on CPU for calls without streaming states.

It is built into the same extension as the scan kernel (``scan_kernel.load_kernel``), with
the same fallback: where that extension is unavailable, ``F.conv1d``.
Why a kernel: Mamba's conv has 4 taps per channel; ``F.conv1d`` pads, copies a
strided input and runs a general depthwise convolution whose backward cost the tiny
configs' Mamba layer more than its forward and backward scans together (BENCHMARKS.md,
"Profile"). Here each channel's rows are 4 multiply-adds per step, and the output comes
in the (d, b, l) memory that the x projection multiplies without a copy.
"""

import torch

from fairseq_mamba.ops.scan_kernel import _rows, load_kernel


def conv_kernel_applies(x, activation, stateful):
    """Whether KernelCausalConv1d takes this call (CPU, no states, silu or none)."""
    return (x.device.type == "cpu" and not stateful and activation in (None, "silu", "swish")
            and load_kernel() is not None)


class KernelCausalConv1d(torch.autograd.Function):
    """apply(x (b, d, l), weight (d, width), bias (d,) or None, silu: bool) -> (b, d, l) in
    x's dtype, a view of (d, b, l) memory. Math in fp32 (fp64 for fp64 inputs); backward
    recomputes the pre-activation instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ct = torch.promote_types(torch.float32, x.dtype)
        xc, wc = _rows(x, ct), weight.to(ct).contiguous()
        bc = None if bias is None else bias.to(ct).contiguous()
        ctx.save_for_backward(xc, wc, bc)
        ctx.silu, ctx.dtypes = silu, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return load_kernel().conv_fwd(xc, wc, bc, silu).to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x, w, b = ctx.saved_tensors
        dx, dw, db = load_kernel().conv_bwd(x, w, b, _rows(gout, x.dtype), ctx.silu)
        tx, tw, tb = ctx.dtypes
        return dx.to(tx), dw.to(tw), None if b is None else db.to(tb), None
