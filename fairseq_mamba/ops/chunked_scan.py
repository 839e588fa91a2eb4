"""Chunked selective scan for CPU (and any device without the CUDA kernel).

Same math as ``selective_scan_reference`` (see selective_scan.py). Time is cut
into chunks of ``chunk`` steps. Per chunk everything that is not sequential is
vectorised over the chunk in a time-major layout: exp(delta A), delta u B, the
contraction with C, and in backward all the gradient contractions (batched
matmuls). Only the recurrences themselves are a Python loop of one fused
``addcmul_`` per step, on a (batch, dim, d_state) slab that stays in cache.

Memory: the full (b, d, l, n) state is never stored. Forward keeps only the
state at each chunk boundary; backward recomputes a chunk's states from its
boundary, then runs the reverse (adjoint) recurrence over that chunk.

Backward math, with a_t = exp(delta_t A), h_t = a_t h_{t-1} + delta_t u_t B_t,
y_t = <h_t, C_t>, gy_t = dL/dy_t:
    dh_t   = gy_t C_t + a_{t+1} dh_{t+1}        (reverse recurrence)
    dC_t   = sum_d gy_t h_t ;  dB_t = sum_d dh_t delta_t u_t
    d(delta u)_t = <dh_t, B_t>
    q_t    = dh_t a_t h_{t-1}  (= dL/d(delta_t A))
    ddelta_t += sum_n q_t A ;  dA += sum_{b,t} q_t delta_t

Chunk layouts (T = chunk length, g = groups, e = dim // g):
    per-step values (T, b, d); B/C chunks (T, b, g, n); state chunks (T, b, d, n).
"""

import math

import torch
import torch.nn.functional as F

# Steps per chunk, chosen by measurement (run_scripts/benchmark.py --chunk-sweep).
CHUNK = 16


def _tbd(x, t0, t1, dtype):
    """(b, d, l) slice [t0, t1) -> contiguous (T, b, d) in ``dtype`` (maybe a view).

    Two copies (rows of T, then a plain 2-D transpose) instead of one permuted
    copy: the second one hits PyTorch's blocked transpose kernel, measured ~2x
    faster than the generic strided copy.
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
    """The per-step inputs of one chunk, in the compute dtype, time-major.

    u, dt, dt_raw, dtu, z: (T, b, d); B, C: (T, b, n, g).
    """

    def __init__(self, inputs, t0, t1, ct, softplus):
        u, delta, B, C, z, bias = inputs
        self.u = _tbd(u, t0, t1, ct)
        self.dt_raw = _tbd(delta, t0, t1, ct)
        if bias is not None:
            self.dt_raw = self.dt_raw + bias.to(ct)  # not in place: may view delta
        self.dt = F.softplus(self.dt_raw) if softplus else self.dt_raw
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


def _states(ch, At2, h0, a, H):
    """Fill a = exp(delta A) and H = the states h_t of one chunk, from h0.

    At2: (n, d) from _log2e_At; h0: (b, n, d); a, H: (T, b, n, d) buffers.
    """
    g = ch.B.shape[-1]
    torch.mul(ch.dt.unsqueeze(2), At2, out=a)
    a.exp2_()
    # delta u B, B broadcast over the channels of its group.
    torch.mul(_grouped(ch.dtu.unsqueeze(2), g), ch.B.unsqueeze(-1), out=_grouped(H, g))
    H[0].addcmul_(a[0], h0)
    for t in range(1, len(H)):
        H[t].addcmul_(a[t], H[t - 1])


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


def _buffers(like, length, chunk, b, n, d, ct, count):
    T = min(chunk, max(length, 1))
    return [like.new_empty((T, b, n, d), dtype=ct) for _ in range(count)]


def _out_grads(gout, ch, y, Dc, t0, t1, ct, dz):
    """From dL/dout of a chunk to gy = dL/dy; writes dz. y = <h, C> + D u (T, b, d)."""
    T, b, d = ch.u.shape
    gy = gout.new_zeros((T, b, d), dtype=ct) if gout is None else _tbd(gout, t0, t1, ct)
    if ch.z is None:
        return gy
    sz = torch.sigmoid(ch.z)
    # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
    dz_c = gy * y * sz * (1 + ch.z * (1 - sz))
    _store_bdl(dz, t0, t1, dz_c)
    return gy * ch.z * sz


class ChunkedSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, chunk).

    B and C come grouped: (b, g, n, l). Returns (out (b, d, l) in u's dtype,
    last_state (b, d, n) in the compute dtype). State buffers are (T, b, n, d):
    channels innermost, so the contractions over n are vector-matrix products.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk):
        ctx.set_materialize_grads(False)
        b, d, length = u.shape
        n = A.shape[1]
        ct = torch.promote_types(torch.float32, u.dtype)
        ctx.ct, ctx.softplus, ctx.chunk = ct, softplus, chunk
        inputs = (u, delta, B, C, z, delta_bias)
        starts = range(0, length, chunk)
        # bounds[k] = the state before chunk k, kept for backward (one allocation);
        # without autograd only the running state is kept.
        save = any(ctx.needs_input_grad)
        bounds = u.new_zeros((len(starts) + 1 if save else 2, b, n, d), dtype=ct)
        out = u.new_empty(u.shape)
        with torch.autocast(u.device.type, enabled=False):
            At2 = _log2e_At(A, ct)
            Dc = None if D is None else D.to(ct)
            a, H = _buffers(u, length, chunk, b, n, d, ct, 2)
            for k, t0 in enumerate(starts):
                t1 = min(t0 + chunk, length)
                T = t1 - t0
                ch = _Chunk(inputs, t0, t1, ct, softplus)
                h0, h1 = (bounds[k], bounds[k + 1]) if save else (bounds[k % 2], bounds[1 - k % 2])
                _states(ch, At2, h0, a[:T], H[:T])
                h1.copy_(H[T - 1])
                y = _contract_n(H[:T], ch.C)
                if Dc is not None:
                    y += ch.u * Dc
                if ch.z is not None:
                    y *= F.silu(ch.z)
                _store_bdl(out, t0, t1, y)
        last = bounds[len(starts) if save else len(starts) % 2]
        if save:
            ctx.bounds = bounds
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return out, last.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        inputs = (u, delta, B, C, z, delta_bias)
        ct, chunk = ctx.ct, ctx.chunk
        b, d, length = u.shape
        n, g = A.shape[1], B.shape[1]
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dB = B.new_zeros(B.shape, dtype=ct)
        dC = C.new_zeros(C.shape, dtype=ct)
        dAt = A.new_zeros((n, d), dtype=ct)
        dD = None if D is None else D.new_zeros(d, dtype=ct)
        dbias = None if delta_bias is None else delta_bias.new_zeros(d, dtype=ct)
        # carry = dL/dh at the last step of the chunk, from the steps after it.
        carry = (u.new_zeros((b, n, d), dtype=ct) if glast is None
                 else glast.to(ct).transpose(1, 2))
        starts = list(range(0, length, chunk))
        with torch.autocast(u.device.type, enabled=False):
            At = A.to(ct).t().contiguous()
            At2 = _log2e_At(A, ct)
            Dc = None if D is None else D.to(ct)
            bufs = _buffers(u, length, chunk, b, n, d, ct, 3)
            for k in reversed(range(len(starts))):
                t0 = starts[k]
                t1 = min(t0 + chunk, length)
                ch = _Chunk(inputs, t0, t1, ct, ctx.softplus)
                # Three (T, b, n, d) buffers; G and H double as scratch once free.
                a, H, G = (buf[:t1 - t0] for buf in bufs)
                h0 = ctx.bounds[k]
                _states(ch, At2, h0, a, H)
                y = None
                if z is not None:
                    y = _contract_n(H, ch.C)
                    if Dc is not None:
                        y += ch.u * Dc
                gy = _out_grads(gout, ch, y, Dc, t0, t1, ct, dz)
                du_c = torch.zeros_like(gy) if Dc is None else gy * Dc
                if Dc is not None:
                    dD += (gy * ch.u).sum((0, 1))
                dC[..., t0:t1] = _contract_d(H, gy, g, scratch=G).permute(1, 3, 2, 0)
                # Reverse recurrence dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
                torch.mul(_grouped(gy.unsqueeze(2), g), ch.C.unsqueeze(-1),
                          out=_grouped(G, g))
                G[-1] += carry
                for t in range(len(G) - 2, -1, -1):
                    G[t].addcmul_(a[t + 1], G[t + 1])
                d_dtu = _contract_n(G, ch.B)
                # q_t = dh_t a_t h_{t-1} = dL/d(delta_t A), built in place in a.
                q = a.mul_(G)
                carry = q[0].clone()  # a_t0 dh_t0 flows into the previous chunk
                q[1:].mul_(H[:-1])
                q[0].mul_(h0)
                dB[..., t0:t1] = _contract_d(G, ch.dtu, g, scratch=H).permute(1, 3, 2, 0)
                ddt = torch.mul(q, At, out=H).sum(2) + d_dtu * ch.u
                dAt += torch.mul(q, ch.dt.unsqueeze(2), out=G).sum((0, 1))
                du_c += d_dtu * ch.dt
                if ctx.softplus:
                    ddt *= torch.sigmoid(ch.dt_raw)
                if dbias is not None:
                    dbias += ddt.sum((0, 1))
                _store_bdl(du, t0, t1, du_c)
                _store_bdl(ddelta, t0, t1, ddt)

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (du, ddelta, cast(dAt.t(), A), cast(dB, B), cast(dC, C), cast(dD, D), dz,
                cast(dbias, delta_bias), None, None)
