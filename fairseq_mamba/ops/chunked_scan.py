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

import torch
import torch.nn.functional as F

# Steps per chunk, chosen by measurement (run_scripts/benchmark.py --chunk-sweep).
CHUNK = 16


def _tbd(x, t0, t1, dtype):
    """(b, d, l) slice [t0, t1) -> a new contiguous (T, b, d) tensor in ``dtype``.

    Always a copy (callers modify it in place), even when the slice happens to be
    contiguous already, e.g. for b == 1 and T == 1.
    """
    return x[:, :, t0:t1].permute(2, 0, 1).to(dtype, memory_format=torch.contiguous_format,
                                                copy=True)


def _tbgn(x, t0, t1, dtype):
    """(b, g, n, l) slice [t0, t1) -> contiguous (T, b, g, n) in ``dtype``."""
    return x[..., t0:t1].permute(3, 0, 1, 2).to(dtype).contiguous()


class _Chunk:
    """The per-step inputs of one chunk, in the compute dtype, time-major."""

    def __init__(self, inputs, t0, t1, ct, softplus):
        u, delta, B, C, z, bias = inputs
        self.u = _tbd(u, t0, t1, ct)
        self.dt_raw = _tbd(delta, t0, t1, ct)
        if bias is not None:
            self.dt_raw += bias.to(ct)
        self.dt = F.softplus(self.dt_raw) if softplus else self.dt_raw
        self.B = _tbgn(B, t0, t1, ct)
        self.C = _tbgn(C, t0, t1, ct)
        self.z = None if z is None else _tbd(z, t0, t1, ct)


def _states(ch, A, h0, a, H):
    """Fill a = exp(delta A) and H = the states h_t of one chunk, from h0.

    A: (d, n); h0: (b, d, n); a, H: (T, b, d, n) buffers.
    """
    T, b, d = ch.dt.shape
    g = ch.B.shape[2]
    torch.mul(ch.dt.unsqueeze(-1), A, out=a)
    a.exp_()
    # delta u B, broadcast over the channels of each group.
    torch.mul((ch.dt * ch.u).view(T, b, g, d // g, 1), ch.B.unsqueeze(3),
              out=H.view(T, b, g, d // g, -1))
    H[0].addcmul_(a[0], h0)
    for t in range(1, T):
        H[t].addcmul_(a[t], H[t - 1])


def _contract_n(S, V):
    """sum_n S[t,b,d,n] V[t,b,g(d),n] -> (T, b, d). S: (T,b,d,n), V: (T,b,g,n)."""
    T, b, d, n = S.shape
    g = V.shape[2]
    out = torch.matmul(S.view(T * b * g, d // g, n), V.view(T * b * g, n, 1))
    return out.view(T, b, d)


def _contract_d(S, w, g):
    """sum over the channels d of each group of S[t,b,d,n] w[t,b,d] -> (T, b, g, n)."""
    T, b, d, n = S.shape
    St = S.view(T * b * g, d // g, n).transpose(1, 2)
    return torch.matmul(St, w.reshape(T * b * g, d // g, 1)).view(T, b, g, n)


def _buffers(like, length, chunk, b, d, n, ct, count):
    T = min(chunk, max(length, 1))
    return [like.new_empty((T, b, d, n), dtype=ct) for _ in range(count)]


class ChunkedSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, chunk).

    B and C come grouped: (b, g, n, l). Returns (out (b, d, l) in u's dtype,
    last_state (b, d, n) in the compute dtype).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk):
        ctx.set_materialize_grads(False)
        b, d, length = u.shape
        n = A.shape[1]
        ct = torch.promote_types(torch.float32, u.dtype)
        ctx.ct, ctx.softplus, ctx.chunk = ct, softplus, chunk
        inputs = (u, delta, B, C, z, delta_bias)
        Ac = A.to(ct)
        Dc = None if D is None else D.to(ct)
        save = any(ctx.needs_input_grad)
        out = u.new_empty(u.shape)
        h = u.new_zeros((b, d, n), dtype=ct)
        a, H = _buffers(u, length, chunk, b, d, n, ct, 2)
        bounds = []
        with torch.autocast(u.device.type, enabled=False):
            for t0 in range(0, length, chunk):
                t1 = min(t0 + chunk, length)
                T = t1 - t0
                if save:
                    bounds.append(h)
                ch = _Chunk(inputs, t0, t1, ct, softplus)
                _states(ch, Ac, h, a[:T], H[:T])
                y = _contract_n(H[:T], ch.C)
                if Dc is not None:
                    y += ch.u * Dc
                if ch.z is not None:
                    y *= F.silu(ch.z)
                out[:, :, t0:t1].copy_(y.permute(1, 2, 0))
                h = H[T - 1].clone()
        if save:
            ctx.bounds = bounds
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return out, h

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        inputs = (u, delta, B, C, z, delta_bias)
        ct, chunk = ctx.ct, ctx.chunk
        b, d, length = u.shape
        n, g = A.shape[1], B.shape[1]
        Ac = A.to(ct)
        Dc = None if D is None else D.to(ct)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA = torch.zeros_like(Ac)
        dB = B.new_zeros(B.shape, dtype=ct)
        dC = C.new_zeros(C.shape, dtype=ct)
        dD = None if D is None else torch.zeros_like(Dc)
        dbias = None if delta_bias is None else delta_bias.new_zeros(d, dtype=ct)
        # carry = dL/dh at the last step of the chunk, from the steps after it.
        carry = u.new_zeros((b, d, n), dtype=ct) if glast is None else glast.to(ct)
        a, H, G = _buffers(u, length, chunk, b, d, n, ct, 3)
        starts = list(range(0, length, chunk))
        with torch.autocast(u.device.type, enabled=False):
            for k in reversed(range(len(starts))):
                t0 = starts[k]
                t1 = min(t0 + chunk, length)
                T = t1 - t0
                ch = _Chunk(inputs, t0, t1, ct, ctx.softplus)
                h0 = ctx.bounds[k]
                aT, HT, GT = a[:T], H[:T], G[:T]
                _states(ch, Ac, h0, aT, HT)
                gy = u.new_zeros((T, b, d), dtype=ct) if gout is None \
                    else _tbd(gout, t0, t1, ct)
                if z is not None:
                    y = _contract_n(HT, ch.C)
                    if Dc is not None:
                        y += ch.u * Dc
                    sz = torch.sigmoid(ch.z)
                    # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
                    dz_c = gy * y * sz * (1 + ch.z * (1 - sz))
                    dz[:, :, t0:t1].copy_(dz_c.permute(1, 2, 0))
                    gy = gy * ch.z * sz
                du_c = torch.zeros_like(gy) if Dc is None else gy * Dc
                if Dc is not None:
                    dD += (gy * ch.u).sum((0, 1))
                # Reverse recurrence dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
                torch.mul(gy.view(T, b, g, d // g, 1), ch.C.unsqueeze(3),
                          out=GT.view(T, b, g, d // g, n))
                GT[T - 1] += carry
                for t in range(T - 2, -1, -1):
                    GT[t].addcmul_(aT[t + 1], GT[t + 1])
                dC[..., t0:t1] = _contract_d(HT, gy, g).permute(1, 2, 3, 0)
                dtu = ch.dt * ch.u
                dB[..., t0:t1] = _contract_d(GT, dtu, g).permute(1, 2, 3, 0)
                d_dtu = _contract_n(GT, ch.B)
                # q_t = dh_t a_t h_{t-1}, built in place in a.
                aT.mul_(GT)
                carry = aT[0].clone()
                aT[1:].mul_(HT[:-1])
                aT[0].mul_(h0)
                q = aT.view(T * b, d, n)
                ddt = torch.matmul(q.transpose(0, 1), Ac.unsqueeze(-1))  # (d, T*b, 1)
                ddt = ddt.view(d, T, b).permute(1, 2, 0) + d_dtu * ch.u
                dt_flat = ch.dt.view(T * b, d).t().unsqueeze(-1)  # (d, T*b, 1)
                dA += torch.matmul(q.permute(1, 2, 0), dt_flat).squeeze(-1)
                du_c += d_dtu * ch.dt
                if ctx.softplus:
                    ddt = ddt * torch.sigmoid(ch.dt_raw)
                if dbias is not None:
                    dbias += ddt.sum((0, 1))
                du[:, :, t0:t1].copy_(du_c.permute(1, 2, 0))
                ddelta[:, :, t0:t1].copy_(ddt.permute(1, 2, 0))
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz,
                cast(dbias, delta_bias), None, None)
