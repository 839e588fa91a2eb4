"""The compiled CPU selective scan (csrc/selective_scan_cpu.cpp) and its autograd Function.

Same math and arguments as ``selective_scan_reference`` (selective_scan.py). Each
(batch, channel) is one sequential loop over time with its d_state states in
registers, spread over torch's intra-op threads (``at::parallel_for``); the
(b, d, l, n) state is never stored. Forward saves the state at every ``CHUNK``-step
boundary; backward recomputes one chunk's states at a time from it (chunk x n values,
in L1) and runs the adjoint recurrence over them.

Why a C++ extension (chosen by measurement, BENCHMARKS.md "CPU scan kernel"): at batch 4,
dim 1536, d_state 16, length 1000, one thread, its forward+backward ran 2.4-2.9x faster than
the eager chunked scan (whose ~17 elementwise passes over the state are the cost of
materialising per-chunk states in eager PyTorch); the issue's own measurement found a
naive numba loop slower than the chunked scan; torch.compile was not measured (it
would unroll a Python loop over every time step into one graph). exp() is a branch-free polynomial (exp2_fast in the C++) so that
the compiler vectorises the state loop; glibc's vector exp would need -ffast-math.

Why built just in time (``torch.utils.cpp_extension.load``, cached under
TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions) rather than by setup.py: an
editable install would silently keep a stale .so after the source changes, while
``load`` hashes the source and rebuilds. The cold build costs ~25 CPU seconds (about a
minute of wall time on a loaded 2-core box); run_scripts/setup_env.sh pays it once. A build
killed midway leaves torch's lock file, on which every later load would wait forever:
``clear_stale_build_lock`` removes one older than any build takes.
Where the build or the load fails, ``load_kernel`` logs one warning and returns None,
and ``selective_scan`` uses the chunked PyTorch scan. FAIRSEQ_MAMBA_SCAN_KERNEL=0 uses
the chunked scan without trying.

Layouts handed to C++: (b, d, l) values and (b, g, l, n) time-major B and C, all
contiguous in the compute dtype (fp32, or fp64 for fp64 inputs).
"""

import logging
import math
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CHUNK = 64  # steps between saved states: bounds cost n/CHUNK of the inputs' size
MAX_STATE = 256  # d_state the kernel takes (its register arrays); larger: chunked scan
SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
CFLAGS = ["-O3", "-fopenmp-simd"]

STALE_LOCK_SECONDS = 600  # a build takes ~25 CPU s; a lock this old belongs to a killed build
_lock = threading.Lock()
_ext = None
_tried = False


def _cflags():
    """-O3; AVX2+FMA where torch says the CPU has them (the exp2 loop runs ~4x faster
    than with SSE2, measured), named in the build so each kind of CPU gets its own."""
    cap = torch.backends.cpu.get_cpu_capability()
    simd = ["-mavx2", "-mfma"] if cap in ("AVX2", "AVX512") else []
    return ["-O3", "-fopenmp-simd", "-fno-trapping-math"] + simd, ("avx2" if simd else "base")


def clear_stale_build_lock(name):
    """Remove the build lock a killed build left behind (torch's loader waits on it forever:
    every later import of the plugin would hang). True when one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:  # no lock: no build under way
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    logger.warning("fairseq_mamba: removing %s, left %.0f s ago by a build that did not finish", lock, age)
    os.remove(lock)
    return True


def load_kernel():
    """The compiled extension module, built on first use; None where unavailable."""
    global _ext, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("FAIRSEQ_MAMBA_SCAN_KERNEL", "1") == "0":
                return None
            try:
                from torch.utils.cpp_extension import load

                cflags, tag = _cflags()
                clear_stale_build_lock(f"fairseq_mamba_selective_scan_cpu_{tag}")
                _ext = load(name=f"fairseq_mamba_selective_scan_cpu_{tag}",
                            sources=[str(SOURCE)], extra_cflags=cflags, verbose=False)
            except Exception as exc:  # no compiler / ninja, a build error, a bad .so
                logger.warning("fairseq_mamba: CPU selective-scan kernel unavailable (%s); "
                               "using the chunked PyTorch scan", str(exc).splitlines()[0])
        return _ext


def kernel_applies(u, A):
    """Whether KernelSelectiveScan takes these inputs (CPU, d_state <= MAX_STATE)."""
    return u.device.type == "cpu" and A.shape[1] <= MAX_STATE and load_kernel() is not None


def _c(t, ct):
    return None if t is None else t.to(ct).contiguous()


def _time_major(t, ct):
    """(b, g, n, l) -> contiguous (b, g, l, n) in ct."""
    return t.to(ct).transpose(-1, -2).contiguous()


def _cast(grad, dtype, needed):
    return grad.to(dtype) if needed and dtype is not None else None


def _dt(delta, delta_bias, softplus, ct):
    """softplus(delta + delta_bias) as a contiguous (b, d, l) tensor in ct: one strided
    pass from delta (often a transposed view), then softplus."""
    dt = torch.empty(delta.shape, dtype=ct, device=delta.device)
    if delta_bias is not None:
        torch.add(delta, delta_bias.to(ct)[:, None], out=dt)
    else:
        dt.copy_(delta)
    return F.softplus(dt) if softplus else dt


class KernelSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, h0=None, chunk=CHUNK), like
    ChunkedSelectiveScan: B, C grouped (b, g, n, l); h0 (b, d, n) or None; chunk: the
    steps between the states saved for backward.
    Returns (out (b, d, l) in u's dtype, last_state (b, d, n) in the compute dtype).

    dt = softplus(delta + delta_bias) and gate = silu(z) are computed here with
    torch's vectorised ops (per step, not per state: 1/d_state of the scan's work), and
    again in backward rather than saved: saved are the inputs, time-major B and C and
    the chunk-boundary states (n / CHUNK of a (b, d, l) tensor), as in the chunked scan.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, h0=None, chunk=CHUNK):
        ctx.set_materialize_grads(False)
        ct = torch.promote_types(torch.float32, u.dtype)
        with torch.autocast(u.device.type, enabled=False):
            rest = (_c(A, ct), (A.detach().double() * (1.0 / math.log(2.0))).to(ct).contiguous(),
                    _time_major(B, ct), _time_major(C, ct), _c(D, ct))
            save = any(ctx.needs_input_grad)
            gate = None if z is None else F.silu(_c(z, ct))
            out, last, bounds = load_kernel().fwd(
                _c(u, ct), _dt(delta, delta_bias, softplus, ct), gate, *rest, _c(h0, ct),
                chunk, save)
        if save:
            ctx.save_for_backward(u, delta, z, delta_bias, *rest, bounds)
            ctx.softplus, ctx.chunk = bool(softplus), chunk
            ctx.dtypes = [None if t is None else t.dtype
                          for t in (u, delta, A, B, C, D, z, delta_bias, h0)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, z, delta_bias, *rest, bounds = ctx.saved_tensors
        ct = torch.promote_types(torch.float32, u.dtype)
        b, g = u.shape[0], rest[2].shape[1]
        blocks = -(-2 * torch.get_num_threads() // (b * g))  # >= 2 work items a thread
        with torch.autocast(u.device.type, enabled=False):
            dt = _dt(delta, delta_bias, ctx.softplus, ct)
            zc = _c(z, ct)
            sz = None if z is None else torch.sigmoid(zc)
            du, ddt, dgate, dBt, dCt, dA, dD, dh0 = load_kernel().bwd(
                _c(u, ct), dt, None if z is None else zc * sz, *rest, bounds, _c(gout, ct),
                _c(glast, ct), ctx.chunk, blocks)
            if ctx.softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                ddt *= dt.neg_().expm1_().neg_()
            del dt
            dz = None
            if z is not None:  # silu'(z) = sig(z) (1 + z (1 - sig(z))), built in sz
                dz = dgate.mul_(sz)
                dz *= sz.neg_().add_(1).mul_(zc).add_(1)
        tu, tdelta, tA, tB, tC, tD, tz, tbias, th0 = ctx.dtypes
        need = ctx.needs_input_grad + (False,) * 2  # h0 and chunk may be left out
        return (_cast(du, tu, need[0]), _cast(ddt, tdelta, need[1]), _cast(dA, tA, need[2]),
                _cast(dBt.transpose(-1, -2), tB, need[3]),
                _cast(dCt.transpose(-1, -2), tC, need[4]), _cast(dD, tD, need[5]),
                _cast(dz, tz, need[6]),
                _cast(ddt.sum((0, 2)) if tbias is not None else None, tbias, need[7]), None,
                _cast(dh0, th0, need[9]), None)
