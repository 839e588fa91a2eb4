"""The compiled CPU selective scan (csrc/selective_scan_cpu.cpp) and its autograd Function.

Same math and arguments as ``selective_scan_reference`` (selective_scan.py). Each
(batch, channel) is one sequential loop over time with its d_state states in
registers, spread over torch's intra-op threads (``at::parallel_for``); the
(b, d, l, n) state is never stored. Forward saves the state at every ``CHUNK``-step
boundary; backward recomputes one chunk's states at a time from it (chunk x n values,
in L1) and runs the adjoint recurrence over them.

Why a C++ extension (chosen by measurement, BENCHMARKS.md "CPU kernels"): at batch 4, dim
1536, d_state 16, length 1000, one thread, its forward+backward runs 4.05x faster than the
eager chunked scan (0.244 s against 0.988 s; the chunked scan's ~17-26 elementwise passes
over the state are the cost of materialising per-chunk states in eager PyTorch); the issue's
own measurement found a naive numba loop slower than the chunked scan; torch.compile was not
measured (it would unroll a Python loop over every time step into one graph). exp() is a
branch-free polynomial (fast_math.h) so that the compiler vectorises the state loop; glibc's
vector exp would need -ffast-math. The per-step sums over states are AVX2 intrinsics where
the build has AVX2 (state_ops.h; the compiler's in-order reductions cost ~45% of backward's
instructions), beside the readable loops that every other build and d_state runs. Δ's
softplus, silu(z) and their derivatives are computed in the kernel, chunk by chunk into L1
buffers, from the same polynomial: done by torch's eager ops they took 27% of the scan's
forward+backward (profiled: softplus alone ran at ~9 ns an element). The (b, d, l) inputs are read in place with any batch and channel
strides, so the mixer's channel-major projections reach the kernel without copies.

Why built just in time (``torch.utils.cpp_extension.load``, cached under
TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions) rather than by setup.py: an
editable install would silently keep a stale .so after the source changes, while the
build's name carries a digest of every csrc file (``_build_name``), so a change rebuilds.
The cold build of the three files costs ~40 CPU seconds (25 s of wall time on 2 idle
cores); run_scripts/setup_env.sh pays it once. A build
killed midway leaves torch's lock file, on which every later load would wait forever:
``clear_stale_build_lock`` removes one older than any build takes.
Where the build or the load fails, ``load_kernel`` logs one warning and returns None;
``selective_scan`` uses the chunked PyTorch scan and ``causal_conv1d`` F.conv1d.
FAIRSEQ_MAMBA_SCAN_KERNEL=0 takes those fallbacks without trying.

Layouts handed to C++, in the compute dtype (fp32, or fp64 for fp64 inputs): (b, d, l)
values with contiguous rows and any batch and channel strides (the mixer's channel-major
projections are read in place), (b, g, l, n) time-major B and C.
"""

import hashlib
import logging
import math
import os
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHUNK = 64  # steps between saved states: bounds cost n/CHUNK of the inputs' size
MAX_STATE = 256  # d_state the kernel takes (its register arrays); larger: chunked scan
CSRC = Path(__file__).with_name("csrc")  # the scan, the causal conv, their bindings

STALE_LOCK_SECONDS = 600  # a build takes ~25 CPU s; a lock this old belongs to a killed build
_lock = threading.Lock()
_ext = None
_tried = False


def _cflags():
    """-O3; AVX2+FMA where torch says the CPU has them (the exp2 loop runs ~4x faster
    than with SSE2, measured), named in the build so each kind of CPU gets its own.
    -fopenmp: at::parallel_for is inline OpenMP, serial in a build without it (measured: 2
    threads ran no faster than 1). The .so then needs libgomp.so.1, the soname of the one
    torch has loaded, so both share one OpenMP runtime and torch.set_num_threads."""
    cap = torch.backends.cpu.get_cpu_capability()
    simd = ["-mavx2", "-mfma"] if cap in ("AVX2", "AVX512") else []
    return ["-O3", "-fopenmp", "-fno-trapping-math"] + simd, ("avx2" if simd else "base")


def _build_name(tag):
    """The extension's name: the CPU kind and a digest of every csrc file, headers included
    (torch's loader hashes only the .cpp sources, so a changed header alone would keep a
    stale build)."""
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))).hexdigest()
    return f"fairseq_mamba_cpu_kernels_{tag}_{digest[:10]}"


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
                name = _build_name(tag)
                clear_stale_build_lock(name)
                _ext = load(name=name, sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
                            extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler / ninja, a build error, a bad .so
                logger.warning("fairseq_mamba: CPU kernels unavailable (%s); using the chunked "
                               "PyTorch scan and F.conv1d", str(exc).splitlines()[0])
        return _ext


def kernel_applies(u, A):
    """Whether KernelSelectiveScan takes these inputs (CPU, d_state <= MAX_STATE)."""
    return u.device.type == "cpu" and A.shape[1] <= MAX_STATE and load_kernel() is not None


def _c(t, ct):
    return None if t is None else t.to(ct).contiguous()


def _rows(t, ct):
    """t (b, d, l) in ct with contiguous rows (one channel's steps), any batch and channel
    strides, as the kernels read it: a view where it already is (e.g. one half of a
    channel-major projection), else a contiguous copy."""
    if t is None:
        return None
    t = t.to(ct)
    return t if t.shape[2] <= 1 or t.stride(2) == 1 else t.contiguous()


def _time_major(t, ct):
    """(b, g, n, l) -> contiguous (b, g, l, n) in ct."""
    return t.to(ct).transpose(-1, -2).contiguous()


def _cast(grad, dtype, needed):
    return grad.to(dtype) if needed and dtype is not None else None


class KernelSelectiveScan(torch.autograd.Function):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, h0=None, chunk=CHUNK), like
    ChunkedSelectiveScan: B, C grouped (b, g, n, l); h0 (b, d, n) or None; chunk: the
    steps between the states saved for backward.
    Returns (out (b, d, l) in u's dtype, last_state (b, d, n) in the compute dtype).

    Everything per step is in the kernel: Δ + bias, softplus, silu(z) and, in backward,
    their derivatives (computed again there rather than saved). Saved are the inputs (u,
    delta, z as the kernel read them), time-major B and C and the chunk-boundary states
    (n / CHUNK of a (b, d, l) tensor), as in the chunked scan.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, h0=None, chunk=CHUNK):
        ctx.set_materialize_grads(False)
        ct = torch.promote_types(torch.float32, u.dtype)
        with torch.autocast(u.device.type, enabled=False):
            rows = (_rows(u, ct), _rows(delta, ct), _rows(z, ct), _c(delta_bias, ct))
            rest = (_c(A, ct), (A.detach().double() * (1.0 / math.log(2.0))).to(ct).contiguous(),
                    _time_major(B, ct), _time_major(C, ct), _c(D, ct))
            save = any(ctx.needs_input_grad)
            out, last, bounds = load_kernel().fwd(*rows, bool(softplus), *rest, _c(h0, ct),
                                                  chunk, save)
        if save:
            ctx.save_for_backward(*rows, *rest, bounds)
            ctx.softplus, ctx.chunk = bool(softplus), chunk
            ctx.dtypes = [None if t is None else t.dtype
                          for t in (u, delta, A, B, C, D, z, delta_bias, h0)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, z, delta_bias, *rest, bounds = ctx.saved_tensors
        ct = u.dtype
        b, g = u.shape[0], rest[2].shape[1]
        blocks = -(-2 * torch.get_num_threads() // (b * g))  # >= 2 work items a thread
        with torch.autocast(u.device.type, enabled=False):
            du, ddelta, dz, dBt, dCt, dA, dD, dbias, dh0 = load_kernel().bwd(
                u, delta, z, delta_bias, ctx.softplus, *rest, bounds, _rows(gout, ct),
                _c(glast, ct), ctx.chunk, blocks)
        tu, tdelta, tA, tB, tC, tD, tz, tbias, th0 = ctx.dtypes
        need = ctx.needs_input_grad + (False,) * 2  # h0 and chunk may be left out
        return (_cast(du, tu, need[0]), _cast(ddelta, tdelta, need[1]), _cast(dA, tA, need[2]),
                _cast(dBt.transpose(-1, -2), tB, need[3]),
                _cast(dCt.transpose(-1, -2), tC, need[4]), _cast(dD, tD, need[5]),
                _cast(dz if z is not None else None, tz, need[6]),
                _cast(dbias, tbias, need[7]), None, _cast(dh0, th0, need[9]), None)
