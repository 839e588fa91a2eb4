"""Chunked selective scan for CPU (and any device without the CUDA kernel).

Same math as ``selective_scan_reference`` (see selective_scan.py), eager PyTorch.
Time is cut into state chunks of ``chunk`` steps. Everything that is not
sequential is vectorised over a chunk: exp(delta A) (as exp2, like mamba-ssm's
kernel), delta u B, the contraction with C and, in backward, all the gradient
contractions. Only the recurrences are Python loops, of one fused ``addcmul_``
per step on a (b, n, d) slab.

Memory: the (b, d, l, n) states are never stored. Forward keeps only the state
at each chunk boundary (1/chunk of them); backward recomputes a chunk's states
from its boundary, then runs the reverse (adjoint) recurrence over that chunk.

Backward math, with a_t = exp(delta_t A), h_t = a_t h_{t-1} + delta_t u_t B_t,
y_t = <h_t, C_t>, gy_t = dL/dy_t:
    dh_t   = gy_t C_t + a_{t+1} dh_{t+1}        (reverse recurrence)
    dC_t   = sum_d gy_t h_t ;  dB_t = sum_d dh_t delta_t u_t
    d(delta u)_t = <dh_t, B_t>
    q_t    = dh_t a_t h_{t-1}  (= dL/d(delta_t A))
    ddelta_t += sum_n q_t A ;  dA += sum_{b,t} q_t delta_t

Layouts (T = chunk length, g = groups, e = dim // g), all time-major:
    per-step values (T, b, d); B/C chunks (T, b, n, g); states (T, b, n, d), with
    the channels innermost so that the contractions over n are vector-matrix
    products and the recurrence slabs are contiguous.
"""

import math

import torch
import torch.nn.functional as F

# Steps per state chunk and per io chunk, chosen by measurement (the chunk sweep
# of run_scripts/benchmark.py): see ChunkedSelectiveScan.
CHUNK = 16
IO_CHUNK = 64


def _tbd(x, t0, t1, dtype):
    """(b, d, l) slice [t0, t1) -> contiguous (T, b, d) in ``dtype`` (maybe a view).

    Two copies (rows of T, then a plain 2-D transpose) instead of one permuted
    copy: the second one hits PyTorch's blocked transpose kernel; for io chunks
    of 64 steps, measured 1.6x faster than the generic strided copy.
    """
    b, d = x.shape[:2]
    rows = x[:, :, t0:t1].contiguous().view(b * d, t1 - t0)
    return rows.t().contiguous().view(t1 - t0, b, d).to(dtype)


def _store_bdl(dst, t0, t1, y):
    """Write a (T, b, d) chunk into the [t0, t1) slice of the (b, d, l) tensor dst."""
    T, b, d = y.shape
    dst[:, :, t0:t1].copy_(y.view(T, b * d).t().contiguous().view(b, d, T))


def _tbng(x, t0, t1, dtype):
    """(b, g, n, l) slice [t0, t1) -> contiguous (T, b, n, g) in ``dtype``."""
    return x[..., t0:t1].permute(3, 0, 2, 1).to(dtype).contiguous()


class _Chunk:
    """The per-step inputs of one io chunk, in the compute dtype, time-major.

    u, dt, dtu, z: (T, b, d); B, C: (T, b, n, g). Possibly views of the inputs:
    never modified in place.
    """

    def __init__(self, inputs, t0, t1, ct, softplus):
        u, delta, B, C, z, bias = inputs
        self.u = _tbd(u, t0, t1, ct)
        self.dt = _tbd(delta, t0, t1, ct)
        if bias is not None:
            self.dt = self.dt + bias.to(ct)
        if softplus:
            self.dt = F.softplus(self.dt)
        self.dtu = self.dt * self.u
        self.B = _tbng(B, t0, t1, ct)
        self.C = _tbng(C, t0, t1, ct)
        self.z = None if z is None else _tbd(z, t0, t1, ct)


def _grouped(S, g):
    """(T, b, n, d) -> (T, b, n, g, e): the channels of each group last."""
    T, b, n, d = S.shape
    return S.view(T, b, n, g, d // g)


def _log2e_At(A, ct):
    """(d, n) -> (n, d) A * log2(e): exp(delta A) = exp2(delta A log2(e)).

    Like mamba-ssm's CUDA kernel we use exp2: on CPU it measured ~4x faster than
    exp at the same ~1 ulp accuracy. The scaling is done in fp64 so the scaled A
    carries no more rounding than A itself.
    """
    return (A.detach().double() * (1.0 / math.log(2.0))).to(ct).t().contiguous()


def _states(dt, dtu, B, At2, h0, bufs, T):
    """Fill a = exp(delta A) and H = the states h_t of one state chunk, from h0.

    dt, dtu: (T, b, d); B: (T, b, n, g); At2: (n, d) from _log2e_At;
    h0: (b, n, d); bufs: _StateBuffers whose first two are a and H.
    """
    a, H = bufs.get(T, 2)
    a_t, H_t = bufs.steps[0], bufs.steps[1]
    g = B.shape[-1]
    torch.mul(dt.unsqueeze(2), At2, out=a)
    a.exp2_()
    # delta u B, B broadcast over the channels of its group.
    torch.mul(_grouped(dtu.unsqueeze(2), g), B.unsqueeze(-1), out=_grouped(H, g))
    H_t[0].addcmul_(a_t[0], h0)
    for t in range(1, T):
        H_t[t].addcmul_(a_t[t], H_t[t - 1])
    return a, H


def _contract_n(S, V):
    """sum_n S[t,b,n,d] V[t,b,n,g(d)] -> (T, b, d). A batched vector-matrix product."""
    T, b, n, d = S.shape
    return torch.einsum("tbng,tbnge->tbge", V, _grouped(S, V.shape[-1])).reshape(T, b, d)


def _contract_d(S, w, g, scratch):
    """sum_{d in group g} S[t,b,n,d] w[t,b,d] -> (T, b, n, g). w: (T, b, d).

    Multiply-then-sum over the contiguous channel axis: measured faster on CPU
    than the equivalent (strided) batched matrix-vector product.
    """
    prod = torch.mul(_grouped(S, g), _grouped(w.unsqueeze(2), g), out=_grouped(scratch, g))
    return prod.sum(-1)


class _StateBuffers:
    """``count`` (T, b, n, d) buffers reused by every state chunk, and their
    per-step views, made once: at these sizes, indexing a step inside the
    recurrence loops costs about as much as the step's arithmetic."""

    def __init__(self, like, length, chunk, b, n, d, ct, count):
        T = min(chunk, max(length, 1))
        self.full = [like.new_empty((T, b, n, d), dtype=ct) for _ in range(count)]
        self.steps = [buf.unbind(0) for buf in self.full]

    def get(self, T, count):
        """The first ``count`` buffers, cut to T steps."""
        return [buf[:T] for buf in self.full[:count]]


def _spans(length, chunk, io_chunk):
    """[(io_t0, io_t1, [(k, t0, t1), ...]), ...]: io chunks and their state chunks.

    k numbers the state chunks globally (their boundary-state index); t0, t1 are
    offsets inside the io chunk.
    """
    spans = []
    for s0 in range(0, length, io_chunk):
        s1 = min(s0 + io_chunk, length)
        subs = [(t // chunk, t - s0, min(t + chunk, s1) - s0) for t in range(s0, s1, chunk)]
        spans.append((s0, s1, subs))
    return spans


class ChunkedSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, chunk).

    B and C come grouped: (b, g, n, l). Returns (out (b, d, l) in u's dtype,
    last_state (b, d, n) in the compute dtype).

    Two chunk levels: per-step values are moved to/from the time-major layout
    and handled elementwise per io chunk (a multiple of ``chunk``, ~IO_CHUNK
    steps: long enough for cheap transposes); the state work runs per state
    chunk of ``chunk`` steps, on (T, b, n, d) buffers: channels innermost, so the
    contractions over n are vector-matrix products.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk):
        ctx.set_materialize_grads(False)
        b, d, length = u.shape
        n = A.shape[1]
        ct = torch.promote_types(torch.float32, u.dtype)
        spans = _spans(length, chunk, chunk * max(1, IO_CHUNK // chunk))
        ctx.ct, ctx.softplus, ctx.chunk, ctx.spans = ct, softplus, chunk, spans
        inputs = (u, delta, B, C, z, delta_bias)
        n_chunks = -(-length // chunk)
        # bounds[k] = the state before state chunk k, kept for backward (one
        # allocation); without autograd only the running state is kept.
        save = any(ctx.needs_input_grad)
        bounds = u.new_empty((n_chunks + 1 if save else 2, b, n, d), dtype=ct)
        bounds[0].zero_()
        out = u.new_empty(u.shape)
        with torch.autocast(u.device.type, enabled=False):
            At2 = _log2e_At(A, ct)
            bufs = _StateBuffers(u, length, chunk, b, n, d, ct, 2)
            for s0, s1, subs in spans:
                ch = _Chunk(inputs, s0, s1, ct, softplus)
                y = torch.empty_like(ch.u)
                for k, t0, t1 in subs:
                    T = t1 - t0
                    h0, h1 = (bounds[k], bounds[k + 1]) if save else \
                        (bounds[k % 2], bounds[1 - k % 2])
                    _, H = _states(ch.dt[t0:t1], ch.dtu[t0:t1], ch.B[t0:t1], At2, h0, bufs, T)
                    h1.copy_(H[T - 1])
                    y[t0:t1] = _contract_n(H, ch.C[t0:t1])
                if D is not None:
                    y += ch.u * D.to(ct)
                if ch.z is not None:
                    y *= F.silu(ch.z)
                _store_bdl(out, s0, s1, y)
        last = bounds[n_chunks if save else n_chunks % 2]
        if save:
            ctx.bounds = bounds
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return out, last.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        inputs = (u, delta, B, C, z, delta_bias)
        ct = ctx.ct
        b, d, length = u.shape
        n, g = A.shape[1], B.shape[1]
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dB = B.new_zeros(B.shape, dtype=ct)
        dC = C.new_zeros(C.shape, dtype=ct)
        dAt = A.new_zeros((n, d), dtype=ct)
        dD = None if D is None else D.new_zeros(d, dtype=ct)
        dbias = None if delta_bias is None else delta_bias.new_zeros(d, dtype=ct)
        # carry = dL/dh at the last step of a state chunk, from the steps after it.
        carry = (u.new_zeros((b, n, d), dtype=ct) if glast is None
                 else glast.to(ct).transpose(1, 2))
        with torch.autocast(u.device.type, enabled=False):
            At, At2 = A.to(ct).t().contiguous(), _log2e_At(A, ct)
            Dc = None if D is None else D.to(ct)
            bufs = _StateBuffers(u, length, ctx.chunk, b, n, d, ct, 3)
            a_t, G_t = bufs.steps[0], bufs.steps[2]
            for s0, s1, subs in reversed(ctx.spans):
                ch = _Chunk(inputs, s0, s1, ct, ctx.softplus)
                g_out = ch.u.new_zeros(ch.u.shape) if gout is None else _tbd(gout, s0, s1, ct)
                gy = g_out if z is None else g_out * F.silu(ch.z)  # dL/dy, y = <h, C> + D u
                y = torch.empty_like(gy) if z is not None else None
                d_dtu, ddt = torch.empty_like(gy), torch.empty_like(gy)
                for k, t0, t1 in reversed(subs):
                    # Three (T, b, n, d) buffers; G and H double as scratch once free.
                    h0, T = ctx.bounds[k], t1 - t0
                    a, H = _states(ch.dt[t0:t1], ch.dtu[t0:t1], ch.B[t0:t1], At2, h0, bufs, T)
                    G = bufs.get(T, 3)[2]
                    if y is not None:
                        y[t0:t1] = _contract_n(H, ch.C[t0:t1])
                    gy_c = gy[t0:t1]
                    dC[..., s0 + t0:s0 + t1] = \
                        _contract_d(H, gy_c, g, scratch=G).permute(1, 3, 2, 0)
                    # Reverse recurrence dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
                    torch.mul(_grouped(gy_c.unsqueeze(2), g), ch.C[t0:t1].unsqueeze(-1),
                              out=_grouped(G, g))
                    G[-1] += carry
                    for t in range(T - 2, -1, -1):
                        G_t[t].addcmul_(a_t[t + 1], G_t[t + 1])
                    d_dtu[t0:t1] = _contract_n(G, ch.B[t0:t1])
                    # q_t = dh_t a_t h_{t-1} = dL/d(delta_t A), built in place in a.
                    q = a.mul_(G)
                    carry = q[0].clone()  # a_t0 dh_t0 flows into the previous chunk
                    q[1:].mul_(H[:-1])
                    q[0].mul_(h0)
                    dB[..., s0 + t0:s0 + t1] = \
                        _contract_d(G, ch.dtu[t0:t1], g, scratch=H).permute(1, 3, 2, 0)
                    torch.sum(torch.mul(q, At, out=H), 2, out=ddt[t0:t1])
                    dAt += torch.mul(q, ch.dt[t0:t1].unsqueeze(2), out=G).sum((0, 1))
                # Per-step gradients of the whole io chunk.
                du_c = d_dtu * ch.dt
                ddt += d_dtu * ch.u
                if Dc is not None:
                    du_c += gy * Dc
                    dD += (gy * ch.u).sum((0, 1))
                if z is not None:
                    if Dc is not None:
                        y += ch.u * Dc
                    sz = torch.sigmoid(ch.z)
                    # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
                    y *= g_out * sz * (1 + ch.z * (1 - sz))
                    _store_bdl(dz, s0, s1, y)
                    del y, sz, g_out
                if ctx.softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                    ddt *= torch.expm1(-ch.dt).neg_()
                if dbias is not None:
                    dbias += ddt.sum((0, 1))
                _store_bdl(du, s0, s1, du_c)
                _store_bdl(ddelta, s0, s1, ddt)

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (du, ddelta, cast(dAt.t(), A), cast(dB, B), cast(dC, C), cast(dD, D), dz,
                cast(dbias, delta_bias), None, None)
