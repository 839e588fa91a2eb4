"""Chunked selective scan for CPU (and any device without the CUDA kernel).

Same math as ``selective_scan_reference`` (see selective_scan.py), eager PyTorch.
Time is cut into state chunks of ``chunk`` steps. Everything that is not
sequential is vectorised over a chunk: exp(delta A) (as exp2, like mamba-ssm's
kernel), delta u B, the contraction with C and, in backward, all the gradient
contractions. Only the recurrences are Python loops, of one fused ``addcmul_``
per step on a (b, n, d) slab.

Memory: the (b, d, l, n) states are never stored. Forward keeps only the state
at each io-chunk boundary (see ChunkedSelectiveScan). Backward, per io chunk,
recomputes the states at its state-chunk boundaries, then per state chunk (last
first) recomputes the chunk's states and runs the reverse (adjoint) recurrence.
This second level of recomputation costs ~12% time and saves ~0.2x the
inputs+outputs size at 1000 steps (measured, see BENCHMARKS.md).

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

    k numbers the state chunks globally; t0, t1 are offsets inside the io chunk.
    """
    spans = []
    for s0 in range(0, length, io_chunk):
        s1 = min(s0 + io_chunk, length)
        subs = [(t // chunk, t - s0, min(t + chunk, s1) - s0) for t in range(s0, s1, chunk)]
        spans.append((s0, s1, subs))
    return spans


class ChunkedSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, h0=None).

    B and C come grouped: (b, g, n, l); h0: optional initial state (b, d, n).
    Returns (out (b, d, l) in u's dtype, last_state (b, d, n) in the compute dtype).

    Two chunk levels: per-step values are moved to/from the time-major layout
    and handled elementwise per io chunk (a multiple of ``chunk``, ~IO_CHUNK
    steps: long enough for cheap transposes), whose start states are saved for
    backward; the state work runs per state chunk of ``chunk`` steps, on
    (T, b, n, d) buffers: channels innermost, so the contractions over n are
    vector-matrix products.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk, h0=None):
        ctx.set_materialize_grads(False)
        b, d, length = u.shape
        n = A.shape[1]
        ct = torch.promote_types(torch.float32, u.dtype)
        spans = _spans(length, chunk, chunk * max(1, IO_CHUNK // chunk))
        ctx.ct, ctx.softplus, ctx.chunk, ctx.spans = ct, softplus, chunk, spans
        inputs = (u, delta, B, C, z, delta_bias)
        # bounds[i] = the state before io chunk i, kept for backward (one
        # allocation); the states inside an io chunk are recomputed from it.
        save = any(ctx.needs_input_grad)
        bounds = u.new_empty((len(spans) + 1 if save else 1, b, n, d), dtype=ct)
        run = u.new_zeros((2, b, n, d), dtype=ct)  # running state, double-buffered
        if h0 is not None:
            run[0].copy_(h0.transpose(1, 2))
        out = u.new_empty(u.shape)
        with torch.autocast(u.device.type, enabled=False):
            At2 = _log2e_At(A, ct)
            bufs = _StateBuffers(u, length, chunk, b, n, d, ct, 2)
            for i, (s0, s1, subs) in enumerate(spans):
                if save:
                    bounds[i].copy_(run[subs[0][0] % 2])
                ch = _Chunk(inputs, s0, s1, ct, softplus)
                y = torch.empty_like(ch.u)
                for k, t0, t1 in subs:
                    T = t1 - t0
                    _, H = _states(ch.dt[t0:t1], ch.dtu[t0:t1], ch.B[t0:t1], At2,
                                   run[k % 2], bufs, T)
                    run[1 - k % 2].copy_(H[T - 1])
                    y[t0:t1] = _contract_n(H, ch.C[t0:t1])
                if D is not None:
                    y += ch.u * D.to(ct)
                if ch.z is not None:
                    y *= F.silu(ch.z)
                _store_bdl(out, s0, s1, y)
        n_chunks = -(-length // chunk)
        if save:
            ctx.bounds = bounds
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0)
        return out, run[n_chunks % 2].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gout, glast):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            grads = _ScanBackward(ctx, gout, glast).run()
        return grads[:8] + (None, None, grads[8])


class _ScanBackward:
    """Backward of ChunkedSelectiveScan: io chunks last first, and inside each its
    state chunks last first. Returns the gradients of (u, delta, A, B, C, D, z,
    delta_bias, h0) in their dtypes (None for absent ones)."""

    def __init__(self, ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, self.h0 = ctx.saved_tensors
        self.ctx, self.gout = ctx, gout
        self.inputs = (u, delta, B, C, z, delta_bias)
        self.saved = (A, B, C, D, delta_bias)
        ct = self.ct = ctx.ct
        b, d, length = u.shape
        n, self.g = A.shape[1], B.shape[1]
        self.du, self.ddelta = torch.empty_like(u), torch.empty_like(delta)
        self.dz = None if z is None else torch.empty_like(z)
        self.dB = B.new_zeros(B.shape, dtype=ct)
        self.dC = C.new_zeros(C.shape, dtype=ct)
        self.dAt = A.new_zeros((n, d), dtype=ct)
        self.dD = None if D is None else D.new_zeros(d, dtype=ct)
        self.dbias = None if delta_bias is None else delta_bias.new_zeros(d, dtype=ct)
        # carry = dL/dh at the last step of a state chunk, from the steps after it.
        self.carry = (u.new_zeros((b, n, d), dtype=ct) if glast is None
                      else glast.to(ct).transpose(1, 2))
        self.At, self.At2 = A.to(ct).t().contiguous(), _log2e_At(A, ct)
        self.Dc = None if D is None else D.to(ct)
        self.bufs = _StateBuffers(u, length, ctx.chunk, b, n, d, ct, 3)
        n_sub = len(ctx.spans[0][2]) if ctx.spans else 1
        self.starts = u.new_empty((n_sub, b, n, d), dtype=ct)

    def run(self):
        for i in reversed(range(len(self.ctx.spans))):
            self.io_chunk(i)
        A, B, C, D, delta_bias = self.saved

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        # After the first state chunk, carry = a_0 dh_0 = dL/dh_{-1}, the h0 gradient.
        dh0 = None if self.h0 is None else self.carry.transpose(1, 2)
        return (self.du, self.ddelta, cast(self.dAt.t(), A), cast(self.dB, B),
                cast(self.dC, C), cast(self.dD, D), self.dz, cast(self.dbias, delta_bias),
                cast(dh0, self.h0))

    def io_chunk(self, i):
        ctx, ct, Dc, z = self.ctx, self.ct, self.Dc, self.inputs[4]
        s0, s1, subs = ctx.spans[i]
        ch = _Chunk(self.inputs, s0, s1, ct, ctx.softplus)
        # The states before each state chunk, recomputed from the io chunk's.
        self.starts[0].copy_(ctx.bounds[i])
        for j, (_, t0, t1) in enumerate(subs[:-1]):
            _, H = _states(ch.dt[t0:t1], ch.dtu[t0:t1], ch.B[t0:t1], self.At2, self.starts[j],
                           self.bufs, t1 - t0)
            self.starts[j + 1].copy_(H[t1 - t0 - 1])
        g_out = (ch.u.new_zeros(ch.u.shape) if self.gout is None
                 else _tbd(self.gout, s0, s1, ct))
        gy = g_out if z is None else g_out * F.silu(ch.z)  # dL/dy, y = <h, C> + D u
        y = torch.empty_like(gy) if z is not None else None
        d_dtu, ddt = torch.empty_like(gy), torch.empty_like(gy)
        for j in reversed(range(len(subs))):
            _, t0, t1 = subs[j]
            sl = slice(t0, t1)
            y_c = None if y is None else y[sl]
            self.state_chunk(ch, sl, s0, self.starts[j], gy[sl], y_c, d_dtu[sl], ddt[sl])
        # Per-step gradients of the whole io chunk.
        du_c = d_dtu * ch.dt
        ddt += d_dtu * ch.u
        if Dc is not None:
            du_c += gy * Dc
            self.dD += (gy * ch.u).sum((0, 1))
        if z is not None:
            if Dc is not None:
                y += ch.u * Dc
            sz = torch.sigmoid(ch.z)
            # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
            y *= g_out * sz * (1 + ch.z * (1 - sz))
            _store_bdl(self.dz, s0, s1, y)
        if ctx.softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
            ddt *= torch.expm1(-ch.dt).neg_()
        if self.dbias is not None:
            self.dbias += ddt.sum((0, 1))
        _store_bdl(self.du, s0, s1, du_c)
        _store_bdl(self.ddelta, s0, s1, ddt)

    def state_chunk(self, ch, sl, s0, h0, gy, y, d_dtu, ddt):
        """One state chunk [sl] of io chunk ch (at s0) from its start state h0.

        Accumulates dA, writes dB, dC; fills y (if not None), d_dtu = dL/d(delta u)
        and ddt = the delta gradient through A, all (T, b, d) views.
        """
        g, T = self.g, sl.stop - sl.start
        a_t, G_t = self.bufs.steps[0], self.bufs.steps[2]
        # Three (T, b, n, d) buffers; G and H double as scratch once free.
        a, H = _states(ch.dt[sl], ch.dtu[sl], ch.B[sl], self.At2, h0, self.bufs, T)
        G = self.bufs.get(T, 3)[2]
        if y is not None:
            y.copy_(_contract_n(H, ch.C[sl]))
        t_abs = slice(s0 + sl.start, s0 + sl.stop)
        self.dC[..., t_abs] = _contract_d(H, gy, g, scratch=G).permute(1, 3, 2, 0)
        # Reverse recurrence dh_t = gy_t C_t + a_{t+1} dh_{t+1}.
        torch.mul(_grouped(gy.unsqueeze(2), g), ch.C[sl].unsqueeze(-1), out=_grouped(G, g))
        G[-1] += self.carry
        for t in range(T - 2, -1, -1):
            G_t[t].addcmul_(a_t[t + 1], G_t[t + 1])
        d_dtu.copy_(_contract_n(G, ch.B[sl]))
        # q_t = dh_t a_t h_{t-1} = dL/d(delta_t A), built in place in a.
        q = a.mul_(G)
        self.carry = q[0].clone()  # a_t0 dh_t0 flows into the previous chunk
        q[1:].mul_(H[:-1])
        q[0].mul_(h0)
        self.dB[..., t_abs] = _contract_d(G, ch.dtu[sl], g, scratch=H).permute(1, 3, 2, 0)
        torch.sum(torch.mul(q, self.At, out=H), 2, out=ddt)
        self.dAt += torch.mul(q, ch.dt[sl].unsqueeze(2), out=G).sum((0, 1))
