"""Mamba-2's SSD scan: the chunked PyTorch scan against the frame-by-frame reference, and the
kernel call site (mamba_chunk_scan_combined's API) run on CPU through a stand-in."""
import collections

import pytest
import torch

from fairseq_mamba import ops
from fairseq_mamba.ops.ssd_scan import ssd_scan, ssd_scan_chunked, ssd_scan_reference

TOLS = {torch.float32: 1e-4, torch.float64: 1e-10}


def inputs(length, dtype, batch=2, nheads=4, headdim=3, ngroups=2, d_state=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return dict(
        x=rand(batch, length, nheads, headdim), dt=rand(batch, length, nheads, scale=0.5),
        A=(-torch.rand(nheads, generator=g, dtype=torch.float64) * 2 - 0.1).to(dtype).requires_grad_(),
        B=rand(batch, length, ngroups, d_state), C=rand(batch, length, ngroups, d_state),
        D=rand(nheads), dt_bias=rand(nheads, scale=0.5))


def maxabs(t):
    return t.abs().max().item() if t.numel() else 0.0


def run(fn, args, chunk_size, initial=None):
    y, state = fn(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size, D=args["D"],
                  dt_bias=args["dt_bias"], dt_softplus=True, initial_states=initial, return_final_states=True)
    return y, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [0, 1, 2, 7, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_equals_reference_outputs_and_gradients(length, dtype, chunk_size):
    args = inputs(length, dtype)
    initial = torch.randn(2, 4, 3, 5, dtype=dtype, requires_grad=True)
    y, state = run(ssd_scan_chunked, args, chunk_size, initial)
    y_ref, state_ref = run(ssd_scan_reference, args, chunk_size, initial)
    assert y.shape == (2, length, 4, 3) and y.dtype == dtype and state.shape == (2, 4, 3, 5)
    tol = TOLS[dtype]
    assert maxabs(y - y_ref) <= tol and maxabs(state - state_ref) <= tol
    weights = torch.randn(y.shape, dtype=dtype), torch.randn(state.shape, dtype=dtype)
    leaves = [*args.values(), initial]
    grads = torch.autograd.grad((y * weights[0]).sum() + (state * weights[1]).sum(), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (state_ref * weights[1]).sum(), leaves,
                                    allow_unused=True)
    for name, g, g_ref in zip([*args, "initial"], grads, grads_ref):
        if g_ref is None:  # length 0: only the initial state reaches the outputs
            assert g is None or maxabs(g) == 0, name
            continue
        assert maxabs(g - g_ref) <= tol * max(1.0, maxabs(g_ref)), name


def test_reference_is_the_recurrence():
    """One head, one group, d_state 1: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t h_t + D x_t."""
    x, dt, B, C = (torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 1.0, 0.2]),
                   torch.tensor([1.0, 0.5, 2.0]), torch.tensor([2.0, 1.0, 1.0]))
    A, D = -1.0, 0.3
    h, ys = 0.0, []
    for t in range(3):
        h = torch.exp(dt[t] * A) * h + dt[t] * x[t] * B[t]
        ys.append(C[t] * h + D * x[t])
    y = ssd_scan_reference(x.view(1, 3, 1, 1), dt.view(1, 3, 1), torch.tensor([A]), B.view(1, 3, 1, 1),
                           C.view(1, 3, 1, 1), D=torch.tensor([D]))
    assert torch.allclose(y.flatten(), torch.stack(ys), atol=1e-6)
    assert torch.allclose(ssd_scan_chunked(x.view(1, 3, 1, 1), dt.view(1, 3, 1), torch.tensor([A]),
                                           B.view(1, 3, 1, 1), C.view(1, 3, 1, 1), 2, D=torch.tensor([D])).flatten(),
                          torch.stack(ys), atol=1e-6)


def test_pieces_with_carried_state_equal_one_pass():
    args = {k: v.detach() for k, v in inputs(50, torch.float64).items()}
    full, full_state = run(ssd_scan_chunked, args, 8)
    outs, state, start = [], None, 0
    for n in (1, 9, 17, 23):
        piece = {k: (v[:, start:start + n] if v.dim() > 1 else v) for k, v in args.items()}
        y, state = run(ssd_scan_chunked, piece, 8, state)
        outs.append(y)
        start += n
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-10
    assert (state - full_state).abs().max().item() < 1e-10


def test_half_precision_inputs_compute_in_fp32():
    args = {k: v.detach() for k, v in inputs(20, torch.float32).items()}
    y32 = ssd_scan_chunked(args["x"], args["dt"], args["A"], args["B"], args["C"], 8, D=args["D"])
    half = {k: v.to(torch.bfloat16) if k in ("x", "dt", "B", "C") else v for k, v in args.items()}
    y16 = ssd_scan_chunked(half["x"], half["dt"], half["A"], half["B"], half["C"], 8, D=half["D"])
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max().item() < 0.1 * y32.abs().max().item()


def test_bad_shapes_and_chunk_size_are_refused():
    args = {k: v.detach() for k, v in inputs(5, torch.float32).items()}
    with pytest.raises(ValueError, match="ngroups"):
        ssd_scan_chunked(args["x"], args["dt"], args["A"], args["B"][:, :, :1].expand(-1, -1, 3, -1),
                         args["C"][:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="chunk_size=0"):
        ssd_scan_chunked(args["x"], args["dt"], args["A"], args["B"], args["C"], 0)
    with pytest.raises(ValueError, match=r"x must be \(batch"):
        ssd_scan_chunked(args["x"][0], args["dt"], args["A"], args["B"], args["C"])


def stand_in(calls):
    """mamba_chunk_scan_combined's API and dtype contract on CPU, computed by the reference."""
    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                  initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                                  dt_limit=(0.0, float("inf")), return_final_states=False,
                                  return_varlen_states=False):
        calls["mamba_chunk_scan_combined"] += 1
        assert z is None and seq_idx is None and cu_seqlens is None
        assert x.dtype == dt.dtype == B.dtype == C.dtype and A.dtype == torch.float32
        assert all(t is None or t.dtype == torch.float32 for t in (D, dt_bias))
        return ssd_scan_reference(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  initial_states=initial_states, return_final_states=return_final_states)
    return mamba_chunk_scan_combined


def test_kernel_call_site_runs_on_cpu_through_a_stand_in():
    args = {k: v.detach() for k, v in inputs(30, torch.float32).items()}
    calls = collections.Counter()
    expected = run(ssd_scan_chunked, args, 8)
    with ops.use_kernels(ops.Kernels(mamba_chunk_scan_combined=stand_in(calls), device_type="cpu")):
        got = run(ssd_scan, args, 8)
        assert calls["mamba_chunk_scan_combined"] == 1
        args64 = {k: v.double() for k, v in args.items()}
        run(ssd_scan, args64, 8)  # fp64: no kernel is compiled for it, the PyTorch path runs
        assert calls["mamba_chunk_scan_combined"] == 1
    for a, b in zip(got, expected):
        assert (a - b).abs().max().item() < 1e-4
    assert ops.kernel_for("ssd_scan", args["x"]) is None  # no GPU kernel on this CPU
