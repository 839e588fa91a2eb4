"""Baselines for the scan benchmark: mamba-ssm's selective_scan_ref, and a Blelloch scan.

The Blelloch scan is our own small implementation of the approach of mamba.py's
pscan.py (a work-efficient parallel scan over time on (b, l, d, n) tensors, with a
custom backward that runs the same scan reversed in time), for comparison only.
"""

import torch
import torch.nn.functional as F

from fairseq_mamba.ops.reference_kernels import load_selective_scan_interface


def load_mamba_ssm_ref():
    """mamba-ssm's selective_scan_ref without its CUDA/triton parts, or (None, why)."""
    ssi, why = load_selective_scan_interface()
    return (None, why) if ssi is None else (ssi.selective_scan_ref, None)


def _combine_(a, x, right, left):
    """x_r <- a_r x_l + x_r, then a_r <- a_r a_l (the scan's associative operator)."""
    x[:, right].addcmul_(a[:, right], x[:, left])
    a[:, right].mul_(a[:, left])


def _brent_kung_(a, x):
    """In place over dim 1 (length a power of 2): x_t <- a_t x_{t-1} + x_t, inclusive.

    Up-sweep combines pairs at strides 1, 2, 4...; the down-sweep fills in the rest.
    """
    length = a.shape[1]
    levels = length.bit_length() - 1
    for k in range(levels):
        s = 1 << k
        _combine_(a, x, slice(2 * s - 1, None, 2 * s), slice(s - 1, None, 2 * s))
    for k in range(levels - 2, -1, -1):
        s = 1 << k
        _combine_(a, x, slice(3 * s - 1, None, 2 * s), slice(2 * s - 1, length - s, 2 * s))


def _pscan_(a, x):
    """Pads dim 1 to a power of 2 (a = x = 0 after the end), scans in place."""
    length = a.shape[1]
    pad = (1 << max(length - 1, 0).bit_length()) - length
    if pad:
        a = torch.cat([a, a.new_zeros(a.shape[0], pad, *a.shape[2:])], 1)
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)
    _brent_kung_(a, x)
    return x[:, :length]


class BlellochScan(torch.autograd.Function):
    """h = scan(a, x) on (b, l, d, n), mamba.py style: a parallel scan forward and the
    same scan reversed in time for dL/dx; dL/da_t = dL/dx_t h_{t-1}."""

    @staticmethod
    def forward(ctx, a, x):
        h = _pscan_(a.clone(), x.clone())
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        dx = _pscan_(a_next.flip(1), gh.flip(1).contiguous()).flip(1)
        da = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1).mul_(dx)
        return da, dx


def blelloch_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    dA = torch.exp(dt.transpose(1, 2).unsqueeze(-1) * A)  # (b, l, d, n)
    dBu = (dt * u).transpose(1, 2).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    h = BlellochScan.apply(dA, dBu)
    y = torch.matmul(h, C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return (y + u * D[:, None]) * F.silu(z)
