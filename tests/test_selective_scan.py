"""selective_scan (compiled CPU kernel, chunked CPU fallback, CUDA kernel dispatch) vs
selective_scan_reference. Tests marked ``both_impls`` run once on the CPU kernel and once
on the chunked fallback (the ``impl`` fixture).

Tolerances are relative to the scale of the reference tensor:
max|x - ref| <= rtol * max|ref|, per output and per gradient.
"""

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairseq_mamba.ops import (
    HAS_CUDA_SCAN,
    selective_scan,
    selective_scan_reference,
)
from fairseq_mamba.ops import scan_kernel
from fairseq_mamba.ops.chunked_scan import ChunkedSelectiveScan

GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
RTOL = {torch.float32: 1e-5, torch.float64: 1e-11}
both_impls = pytest.mark.usefixtures("impl")
# The module, not the function ``fairseq_mamba.ops`` exports under the same name.
scan_module = importlib.import_module("fairseq_mamba.ops.selective_scan")


@pytest.fixture(params=["kernel", "chunked"])
def impl(request, monkeypatch):
    """selective_scan's CPU path: the compiled kernel, or (patched) the chunked fallback."""
    if request.param == "chunked":
        monkeypatch.setattr(scan_module, "kernel_applies", lambda u, A: False)
    elif scan_kernel.load_kernel() is None:
        if scan_kernel.os.environ.get("FAIRSEQ_MAMBA_SCAN_KERNEL") == "0":
            pytest.skip("FAIRSEQ_MAMBA_SCAN_KERNEL=0: the CPU kernel is switched off")
        pytest.fail("the CPU selective-scan kernel did not build (see the logged warning)")
    return request.param


def make_inputs(batch=2, dim=6, length=33, d_state=4, dtype=torch.float32, groups=None,
                seed=0, device="cpu", with_D=True, with_z=True, with_bias=True, with_h0=False):
    """Realistic Mamba ranges: A = -exp(.) with several decay rates, dt ~ softplus range."""
    g = torch.Generator().manual_seed(seed)
    bc = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        "A": -torch.exp(torch.randn(dim, d_state, generator=g)),
        "B": torch.randn(*bc, generator=g),
        "C": torch.randn(*bc, generator=g),
        "D": torch.randn(dim, generator=g) if with_D else None,
        "z": torch.randn(batch, dim, length, generator=g) if with_z else None,
        "delta_bias": torch.randn(dim, generator=g) * 0.3 if with_bias else None,
        "initial_state": torch.randn(batch, dim, d_state, generator=g) if with_h0 else None,
    }
    return {k: None if v is None else v.to(device, dtype).requires_grad_()
            for k, v in x.items()}


def run(fn, x, softplus=True, last=True, grad_seed=1):
    """Outputs and the gradients of a random linear functional of them."""
    # initial_state only when given: mamba-ssm's reference has no such argument.
    args = {k: v for k, v in x.items() if k != "initial_state" or v is not None}
    res = fn(**args, delta_softplus=softplus, return_last_state=last)
    outs = res if last else (res,)
    g = torch.Generator().manual_seed(grad_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum()
               for o in outs)
    names = [k for k in GRAD_ARGS if x[k] is not None]
    inputs = [x[k] for k in names]
    if not loss.requires_grad:  # e.g. the reference at length 0 without D and z
        return outs, {k: torch.zeros_like(x[k]) for k in names}
    # materialize_grads: a path that does not use an input must give it zeros.
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return outs, dict(zip(names, grads))


def assert_rel_close(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.numel() == 0:
        return
    scale = expected.double().abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max err {err:.3g}, scale {scale:.3g}"


def assert_same(x, fn_a, fn_b, rtol, **kw):
    outs_a, grads_a = run(fn_a, x, **kw)
    outs_b, grads_b = run(fn_b, x, **kw)
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        assert a.dtype == b.dtype
        assert_rel_close(a, b, rtol, f"output {i}")
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert_rel_close(grads_a[k], grads_b[k], rtol, f"grad {k}")


@both_impls
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_state", [1, 4, 16])
@pytest.mark.parametrize("length", [1, 2, 7, 64, 257, 1000])
def test_matches_reference(length, d_state, dtype):
    x = make_inputs(length=length, d_state=d_state, dtype=dtype, dim=4)
    assert_same(x, selective_scan, selective_scan_reference, RTOL[dtype])


@both_impls
@pytest.mark.parametrize("with_D,with_z,with_bias,softplus,last",
                         list(itertools.product([False, True], repeat=5)))
def test_optional_arguments(with_D, with_z, with_bias, softplus, last):
    x = make_inputs(length=40, with_D=with_D, with_z=with_z, with_bias=with_bias)
    if not softplus:  # raw delta must be positive for a decaying state
        x["delta"] = x["delta"].detach().exp().requires_grad_()
    assert_same(x, selective_scan, selective_scan_reference, RTOL[torch.float32],
                softplus=softplus, last=last)


@pytest.mark.parametrize("chunk,length", [(1, 50), (3, 50), (3, 200), (16, 50), (16, 300),
                                          (50, 50), (64, 200), (200, 130)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunk_sizes(chunk, length, with_h0):
    """State and io chunk boundaries (state carried forward, adjoint carried
    backward), full and partial, are exact; so is an initial state and its gradient."""
    x = make_inputs(length=length, dtype=torch.float64, with_h0=with_h0)

    def chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                initial_state=None):
        out, last = ChunkedSelectiveScan.apply(u, delta, A, B.unsqueeze(1), C.unsqueeze(1),
                                               D, z, delta_bias, delta_softplus, chunk,
                                               initial_state)
        return (out, last) if return_last_state else out

    assert_same(x, chunked, selective_scan_reference, RTOL[torch.float64])


@both_impls
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [0, 1, 2, 7, 64, 257, 1000])
@pytest.mark.parametrize("with_D,with_z", [(True, True), (False, False)])
def test_initial_state_matches_reference(length, dtype, with_D, with_z):
    """Outputs, last state and every gradient, initial_state's included."""
    x = make_inputs(length=length, dtype=dtype, dim=4, with_D=with_D, with_z=with_z,
                    with_h0=True)
    assert_same(x, selective_scan, selective_scan_reference, RTOL[dtype])


@both_impls
def test_initial_state_is_h_minus_one():
    """One step by hand: h_0 = exp(dt A) h0 + dt u B, y_0 = <h_0, C>."""
    x = make_inputs(batch=1, dim=2, length=1, d_state=3, dtype=torch.float64,
                    with_D=False, with_z=False, with_bias=False, with_h0=True)
    v = {k: t.detach() for k, t in x.items() if t is not None}
    dt, u, B, C = v["delta"][0, :, 0], v["u"][0, :, 0], v["B"][0, :, 0], v["C"][0, :, 0]
    h = torch.exp(dt[:, None] * v["A"]) * v["initial_state"][0] + (dt * u)[:, None] * B
    for fn in (selective_scan, selective_scan_reference):
        out, last = fn(**v, return_last_state=True)
        torch.testing.assert_close(last[0], h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[0, :, 0], (h * C).sum(-1), rtol=1e-12, atol=1e-12)


@both_impls
@pytest.mark.parametrize("splits", [[1], [16], [50], [1, 2, 3], [33, 34, 90], [0, 64, 64, 127]])
def test_pieces_with_carried_state_equal_one_pass(splits):
    """Scan [0, s1), [s1, s2), ... each from the last state of the one before: the same
    outputs, last state and input gradients as one pass (the gradient flows back through
    every carried state)."""
    x = make_inputs(length=128, dtype=torch.float64)
    edges = [0, *splits, 128]

    def pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
               initial_state=None):
        outs, state = [], initial_state
        for t0, t1 in zip(edges[:-1], edges[1:]):
            out, state = selective_scan(u[..., t0:t1], delta[..., t0:t1], A, B[..., t0:t1],
                                        C[..., t0:t1], D, z[..., t0:t1], delta_bias,
                                        delta_softplus, True, initial_state=state)
            outs.append(out)
        out = torch.cat(outs, dim=-1)
        return (out, state) if return_last_state else out

    assert_same(x, pieces, selective_scan_reference, RTOL[torch.float64])


@both_impls
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_B_C(groups):
    x = make_inputs(dim=6, length=21, groups=groups)
    assert_same(x, selective_scan, selective_scan_reference, RTOL[torch.float32])


@both_impls
def test_grouped_reference_repeats_groups():
    """4-D B/C: channel d uses group d // (dim // groups), like mamba-ssm's repeat."""
    x = make_inputs(dim=6, length=9, groups=2)
    flat = dict(x)
    for k in ("B", "C"):
        flat[k] = x[k][:, 0]
    # With both groups equal the grouped scan is the ungrouped one.
    for k in ("B", "C"):
        x[k] = torch.stack([flat[k], flat[k]], 1)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan(**x), selective_scan(**flat))


def test_reference_against_closed_form():
    """The reference itself: h_t = sum_s exp(A sum_{s<r<=t} dt_r) dt_s u_s B_s (fp64)."""
    x = make_inputs(batch=1, dim=2, length=6, d_state=3, dtype=torch.float64,
                    with_D=False, with_z=False, with_bias=False)
    u, dt, A, B, C = (x[k].detach()[0] if k != "A" else x[k].detach()
                      for k in ("u", "delta", "A", "B", "C"))
    expected = torch.zeros(2, 6, dtype=torch.float64)
    for d, t, n in itertools.product(range(2), range(6), range(3)):
        for s in range(t + 1):
            decay = math.exp(A[d, n] * dt[d, s + 1:t + 1].sum())
            expected[d, t] += decay * dt[d, s] * u[d, s] * B[n, s] * C[n, t]
    with torch.no_grad():
        out = selective_scan_reference(**x)
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)


def _mamba_ssm_selective_scan_ref():
    """mamba-ssm's own pure-PyTorch reference, loaded as the benchmark loads it."""
    path = Path(__file__).resolve().parents[1] / "run_scripts" / "scan_baselines.py"
    spec = importlib.util.spec_from_file_location("scan_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_mamba_ssm_ref()


@pytest.mark.parametrize("groups", [None, 2])
def test_reference_matches_mamba_ssm(groups):
    """Our reference has mamba-ssm's semantics (skipped without mamba_ssm installed)."""
    ref, why = _mamba_ssm_selective_scan_ref()
    if ref is None:
        pytest.skip(why)
    x = make_inputs(length=37, groups=groups)
    assert_same(x, selective_scan_reference, ref, RTOL[torch.float32])


@both_impls
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half inputs: state math in fp32, so only the input/output rounding differs."""
    x32 = make_inputs(length=64, dim=8)
    xh = {k: None if v is None else v.detach().to(dtype).requires_grad_()
          for k, v in x32.items()}
    x_rounded = {k: None if v is None else v.detach().float().requires_grad_()
                 for k, v in xh.items()}
    (out, last), grads = run(selective_scan, xh)
    (ref_out, ref_last), ref_grads = run(selective_scan_reference, x_rounded)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_rel_close(out.float(), ref_out, 1e-2, "output")
    assert_rel_close(last, ref_last, 1e-5, "last state")
    for k in grads:
        assert grads[k].dtype == dtype
        assert_rel_close(grads[k].float(), ref_grads[k], 2e-2, f"grad {k}")


@both_impls
def test_autocast_keeps_fp32_state():
    x = make_inputs(length=64)
    ref, ref_grads = run(selective_scan_reference, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, last), grads = run(selective_scan, x)
        (r_out, r_last), _ = run(selective_scan_reference, x)
    assert out.dtype == last.dtype == r_out.dtype == r_last.dtype == torch.float32
    assert_rel_close(out, ref[0], 1e-5, "output")
    assert_rel_close(last, ref[1], 1e-5, "last state")
    assert_rel_close(r_out, ref[0], 1e-5, "reference output")
    for k in grads:
        assert_rel_close(grads[k], ref_grads[k], 1e-5, f"grad {k}")


@both_impls
def test_inputs_not_modified():
    x = make_inputs(batch=1, length=1)  # a (1, d, 1) slice is contiguous: no copy taken
    before = {k: v.detach().clone() for k, v in x.items() if v is not None}
    run(selective_scan, x)
    for k, v in before.items():
        assert torch.equal(x[k].detach(), v), k


@both_impls
def test_backward_twice_with_retain_graph():
    """Backward leaves the saved state intact: a second backward gives the same grads."""
    x = make_inputs(length=70)
    out = selective_scan(**x, delta_softplus=True)
    first = torch.autograd.grad(out.sum(), [x["u"], x["A"]], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x["u"], x["A"]])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference])
@both_impls
def test_length_zero(fn):
    x = make_inputs(length=0)
    (out, last), grads = run(fn, x)
    assert out.shape == (2, 6, 0)
    assert torch.equal(last, torch.zeros(2, 6, 4))
    for k in ("A", "D", "delta_bias"):
        assert torch.equal(grads[k], torch.zeros_like(grads[k]))


@both_impls
# (1e4, 1e6): |dt A| log2 e ~ 1e10, past the kernel's 2^30 bound on exp2's argument (it caps
# dt there; the decay is 0 either way).
@pytest.mark.parametrize("scale,a_scale", [(1e4, 1.0), (1e-8, 1.0), (1.0, 1e4), (30.0, 1e-6),
                                           (1e4, 1e6)])
def test_extreme_delta_is_finite(scale, a_scale):
    """Huge/tiny dt*A: decays to exactly 0 or stays ~1; nothing overflows."""
    x = make_inputs(length=300, dim=4, with_bias=False)  # raw dt must stay positive
    x["delta"] = torch.full_like(x["delta"], scale).requires_grad_()
    x["A"] = (x["A"].detach() * a_scale).requires_grad_()
    assert_same(x, selective_scan, selective_scan_reference, 1e-5, softplus=False)


@both_impls
def test_extreme_inputs_are_finite():
    x = make_inputs(length=257, dim=4)
    x["delta"] = (torch.randn_like(x["delta"]) * 40).requires_grad_()  # softplus saturates
    x["u"] = (x["u"].detach() * 1e6).requires_grad_()
    assert_same(x, selective_scan, selective_scan_reference, 1e-5)


@both_impls
def test_long_sequence_is_finite():
    x = make_inputs(batch=1, dim=2, length=30_000, d_state=2)
    x["A"] = torch.full_like(x["A"], -1e-4).requires_grad_()  # state barely decays
    (out, last), grads = run(selective_scan, x)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        ref = selective_scan_reference(**x, delta_softplus=True)
    assert_rel_close(out, ref, 1e-4, "output")  # fp32 sums over 30k steps


def _bad(**changes):
    x = {k: None if v is None else v.detach() for k, v in make_inputs(length=5).items()}
    x.update(changes)
    return x


BAD_INPUTS = [
    (_bad(u=torch.zeros(2, 6)), r"u must be .*\(2, 6\)"),
    (_bad(delta=torch.zeros(2, 6, 4)), r"delta must .*\(2, 6, 4\)"),
    (_bad(A=torch.zeros(5, 4)), r"A must .*\(5, 4\)"),
    (_bad(A=torch.zeros(6, 4, dtype=torch.complex64)), r"A must be real"),
    (_bad(B=torch.zeros(2, 3, 5)), r"B must .*\(2, 3, 5\)"),
    (_bad(C=torch.zeros(2, 4, 4, 5)), r"C must .*\(2, 4, 4, 5\)"),
    (_bad(B=torch.zeros(2, 2, 4, 5), C=torch.zeros(2, 3, 4, 5)), r"same groups"),
    (_bad(D=torch.zeros(5)), r"D must .*\(5,\)"),
    (_bad(z=torch.zeros(2, 6, 4)), r"z must .*\(2, 6, 4\)"),
    (_bad(delta_bias=torch.zeros(6, 1)), r"delta_bias must .*\(6, 1\)"),
    (_bad(initial_state=torch.zeros(2, 4, 6)), r"initial_state must .*\(2, 4, 6\)"),
]


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference])
@pytest.mark.parametrize("x,match", BAD_INPUTS)
def test_bad_shapes_raise(fn, x, match):
    with pytest.raises(ValueError, match=match):
        fn(**x)


@both_impls
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), dim=st.integers(1, 5), length=st.integers(0, 40),
       d_state=st.integers(1, 5), flags=st.lists(st.booleans(), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(batch, dim, length, d_state, flags, seed):
    with_D, with_z, with_bias, softplus = flags
    x = make_inputs(batch, dim, length, d_state, torch.float64, seed=seed,
                    with_D=with_D, with_z=with_z, with_bias=with_bias)
    if not softplus:
        x["delta"] = x["delta"].detach().exp().requires_grad_()
    assert_same(x, selective_scan, selective_scan_reference, RTOL[torch.float64],
                softplus=softplus)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_CUDA_SCAN,
                    reason="needs a GPU and mamba_ssm's selective_scan_cuda kernel")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_matches_reference(dtype, rtol):
    x = make_inputs(batch=2, dim=16, length=257, d_state=16, device="cuda")
    xd = {k: None if v is None else v.detach().to(dtype if k in ("u", "delta", "z", "B", "C")
                                                  else torch.float32).requires_grad_()
          for k, v in x.items()}
    assert_same(xd, selective_scan, selective_scan_reference, rtol)

