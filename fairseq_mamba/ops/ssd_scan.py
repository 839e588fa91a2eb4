"""Mamba-2's SSD scan (state-space duality): a scalar decay per head, shared B/C per group.

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T       (per head: h (headdim, d_state), A a scalar)
    y_t = h_t C_t + D x_t

Shapes follow mamba-ssm's ``mamba_chunk_scan_combined``: x (batch, length, nheads, headdim),
dt (batch, length, nheads), A (nheads,), B and C (batch, length, ngroups, d_state) with
nheads % ngroups == 0 (head i reads group i // (nheads / ngroups)), D (nheads,) or
(nheads, headdim), dt_bias (nheads,), initial_states (batch, nheads, headdim, d_state).

* :func:`ssd_scan`: mamba-ssm's triton kernel where ``kernel_for`` picks it (a GPU), else
  :func:`ssd_scan_chunked`;
* :func:`ssd_scan_chunked`: pure PyTorch, chunk by chunk: quadratic (attention-like) within a
  chunk, the state carried between chunks; memory O(batch * length * chunk * nheads);
* :func:`ssd_scan_reference`: the recurrence above, one frame at a time (tests only: slow).

All compute in fp32 (fp64 for fp64 inputs) and return x's dtype; the final state is fp32/fp64.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fairseq_mamba.ops.dispatch import kernel_for


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus):
    """Checked inputs in the compute dtype, B and C expanded to one row per head."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, nheads, headdim), got shape {tuple(x.shape)}")
    batch, length, nheads, _ = x.shape
    groups = B.shape[2]
    if nheads % groups or C.shape != B.shape or B.shape[:2] != (batch, length):
        raise ValueError(f"B {tuple(B.shape)} / C {tuple(C.shape)} must be (batch, length, ngroups, "
                         f"d_state) with nheads={nheads} a multiple of ngroups")
    if dt.shape != (batch, length, nheads) or A.shape != (nheads,):
        raise ValueError(f"dt {tuple(dt.shape)} must be {(batch, length, nheads)} and A {tuple(A.shape)} "
                         f"({nheads},)")
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = dt.to(ctype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ctype)
    if dt_softplus:
        dt = F.softplus(dt)
    per_group = nheads // groups
    B = B.to(ctype).repeat_interleave(per_group, dim=2)  # (batch, length, nheads, d_state)
    C = C.to(ctype).repeat_interleave(per_group, dim=2)
    return x.to(ctype), dt, A.to(ctype), B, C


def _initial(x, B, initial_states):
    batch, _, nheads, headdim = x.shape
    if initial_states is None:
        return x.new_zeros(batch, nheads, headdim, B.shape[-1])
    return initial_states.to(x.dtype)


def _finish(y, x, D, out_dtype, state, return_final_states):
    if D is not None:
        y = y + x * (D.to(x.dtype)[:, None] if D.dim() == 1 else D.to(x.dtype))
    y = y.to(out_dtype)
    return (y, state) if return_final_states else y


def ssd_scan_chunked(x, dt, A, B, C, chunk_size: int = 64, D=None, dt_bias=None, dt_softplus=False,
                     initial_states=None, return_final_states=False):
    """The SSD scan in pure PyTorch, ``chunk_size`` frames at a time; arguments as ``ssd_scan``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    state = _initial(x, B, initial_states)  # (batch, nheads, headdim, d_state)
    ys = []
    # split, not sliced per chunk: the backward of a slice writes a zero tensor of the whole
    # input, which made fwd+bwd quadratic in the length; split's backward concatenates once
    pieces = zip(*(t.split(chunk_size, dim=1) for t in (x, dt, B, C))) if x.shape[1] else ()
    for xc, dtc, Bc, Cc in pieces:
        # log decay from the chunk start through frame t (inclusive): (batch, q, nheads)
        a = torch.cumsum(dtc * A, dim=1)
        q = xc.shape[1]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()  # [t, s]: s <= t
        # decay from frame s (after its input) to frame t; masked before exp so that the
        # growing exp(a_s - a_t) of s > t never overflows into 0 * inf
        seg = (a[:, :, None, :] - a[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
        scores = torch.einsum("bthn,bshn->btsh", Cc, Bc) * seg.exp() * dtc[:, None]  # (b, t, s, h)
        y = torch.einsum("btsh,bshp->bthp", scores, xc)
        y = y + torch.einsum("bthn,bhpn->bthp", Cc, state) * a.exp()[..., None]  # the carried state
        to_end = (a[:, -1:] - a).exp() * dtc  # (batch, q, nheads): weight of frame s in the end state
        state = state * a[:, -1].exp()[..., None, None] + torch.einsum("bshn,bsh,bshp->bhpn", Bc, to_end, xc)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)
    return _finish(y, x, D, out_dtype, state, return_final_states)


def ssd_scan_reference(x, dt, A, B, C, chunk_size: int = 64, D=None, dt_bias=None, dt_softplus=False,
                       initial_states=None, return_final_states=False):
    """The SSD recurrence frame by frame (``chunk_size`` is accepted for the common API, unused)."""
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    state = _initial(x, B, initial_states)
    ys = []
    for t in range(x.shape[1]):
        decay = (dt[:, t] * A).exp()[..., None, None]  # (batch, nheads, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return _finish(y, x, D, out_dtype, state, return_final_states)


def ssd_scan(x, dt, A, B, C, chunk_size: int = 64, D: Optional[torch.Tensor] = None,
             dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
             initial_states: Optional[torch.Tensor] = None, return_final_states: bool = False):
    """y (batch, length, nheads, headdim) [, final state (batch, nheads, headdim, d_state)].

    mamba-ssm's ``mamba_chunk_scan_combined`` (same arguments) where ``kernel_for`` picks it,
    else :func:`ssd_scan_chunked`.
    """
    kernel = kernel_for("ssd_scan", x) if x.shape[1] > 0 else None
    if kernel is not None:
        return kernel(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                      initial_states=initial_states, return_final_states=return_final_states)
    return ssd_scan_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                            initial_states=initial_states, return_final_states=return_final_states)
