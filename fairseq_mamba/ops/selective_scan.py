"""Selective scan (Mamba's S6 recurrence) with mamba-ssm's ``selective_scan_fn`` API.

Shapes (b = batch, d = dim, n = d_state, l = length, g = groups):
    u, delta, z      (b, d, l)
    A                (d, n), real
    B, C             (b, n, l) or grouped (b, g, n, l), d % g == 0
    D, delta_bias    (d,)
    out              (b, d, l) in u's dtype
    initial_state    (b, d, n), optional: h_{-1}, e.g. the last_state of the previous chunk
    last_state       (b, d, n) in the compute dtype (fp32, or fp64 for fp64 inputs)

Per channel d and time t (delta' = softplus(delta + delta_bias) if asked):
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t u_t B_t      (h_{-1} = initial_state, or 0)

Scanning a sequence in pieces, each from the previous piece's ``last_state``, gives the
one-pass outputs (the recurrence is the same; only float rounding differs). mamba-ssm's
``selective_scan_fn`` has ``return_last_state`` but no initial state, so a call with
``initial_state`` always takes the PyTorch path; its gradient is returned like any input's.
    y_t = <h_t, C_t> + D u_t ;  out_t = y_t * silu(z_t)

The state math is always done in at least fp32, also under ``torch.autocast``.
"""

import torch
import torch.nn.functional as F

from fairseq_mamba.ops.chunked_scan import CHUNK, ChunkedSelectiveScan
from fairseq_mamba.ops.dispatch import HAS_CUDA_SCAN, kernel_for, mamba_inner_fn, selective_scan_fn
from fairseq_mamba.ops.scan_kernel import KernelSelectiveScan, kernel_applies

__all__ = ["HAS_CUDA_SCAN", "mamba_inner_fn", "selective_scan", "selective_scan_fn",
           "selective_scan_reference"]


def _shape(t):
    return None if t is None else tuple(t.shape)


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """Validate shapes; raise ValueError naming the bad argument and its shape."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {_shape(u)}")
    batch, dim, length = u.shape
    if _shape(delta) != _shape(u):
        raise ValueError(f"delta must have u's shape {_shape(u)}, got shape {_shape(delta)}")
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be real (dim={dim}, d_state), got shape {_shape(A)} "
                         f"dtype {A.dtype}")
    d_state = A.shape[1]
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and _shape(t) == (batch, d_state, length):
            g = 1
        elif (t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (d_state, length)
              and t.shape[1] > 0 and dim % t.shape[1] == 0):
            g = t.shape[1]
        else:
            raise ValueError(
                f"{name} must be (batch, d_state, length)={(batch, d_state, length)} or "
                f"(batch, groups, d_state, length) with dim % groups == 0, "
                f"got shape {_shape(t)}")
        if groups is not None and g != groups:
            raise ValueError(f"B and C must have the same groups, got shapes "
                             f"{_shape(B)} and {_shape(C)}")
        groups = g
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and _shape(t) != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got shape {_shape(t)}")
    if z is not None and _shape(z) != _shape(u):
        raise ValueError(f"z must have u's shape {_shape(u)}, got shape {_shape(z)}")
    if initial_state is not None and _shape(initial_state) != (batch, dim, d_state):
        raise ValueError(f"initial_state must be (batch, dim, d_state)={(batch, dim, d_state)}, "
                         f"got shape {_shape(initial_state)}")


def compute_dtype(u):
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(torch.float32, u.dtype)


def _as_grouped(t):
    """(b, n, l) -> (b, 1, n, l); grouped input unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, initial_state=None):
    """Plain sequential loop over time; the ground truth for every fast path."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    ct = compute_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        dt = delta.to(ct)
        if delta_bias is not None:
            dt = dt + delta_bias.to(ct)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        uc = u.to(ct)
        Bg, Cg = _as_grouped(B).to(ct), _as_grouped(C).to(ct)
        rep = dim // Bg.shape[1]  # channels per group
        Bd = Bg.repeat_interleave(rep, dim=1)  # (b, d, n, l)
        Cd = Cg.repeat_interleave(rep, dim=1)
        Ac = A.to(ct)
        h = (u.new_zeros((batch, dim, A.shape[1]), dtype=ct) if initial_state is None
             else initial_state.to(ct))
        ys = []
        # unbind, not indexing per step: the backward of t-indexing would build a
        # full-size gradient per step (quadratic in length).
        steps = zip(dt.unbind(-1), uc.unbind(-1), Bd.unbind(-1), Cd.unbind(-1))
        for dt_t, u_t, B_t, C_t in steps:  # (b, d), (b, d), (b, d, n), (b, d, n)
            h = torch.exp(dt_t[:, :, None] * Ac) * h + (dt_t * u_t)[:, :, None] * B_t
            ys.append((h * C_t).sum(-1))
        y = torch.stack(ys, dim=2) if ys else uc.new_zeros(uc.shape)
        if D is not None:
            y = y + uc * D.to(ct)[:, None]
        if z is not None:
            y = y * F.silu(z.to(ct))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False, initial_state=None):
    """mamba-ssm's selective_scan_fn where ``ops.dispatch.kernel_for`` picks it (a GPU with the
    kernel, no ``initial_state``); on CPU the compiled kernel (scan_kernel.py) where it builds,
    else the chunked PyTorch path."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = kernel_for("selective_scan", u, stateful=initial_state is not None)
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, return_last_state=return_last_state)
    args = (u, delta, A, _as_grouped(B), _as_grouped(C), D, z, delta_bias, bool(delta_softplus))
    if kernel_applies(u, A):
        out, last_state = KernelSelectiveScan.apply(*args, initial_state)
    else:
        out, last_state = ChunkedSelectiveScan.apply(*args, CHUNK, initial_state)
    return (out, last_state) if return_last_state else out
