"""causal_conv1d (CPU kernel / F.conv1d fallback / CUDA kernel) vs causal_conv1d_reference."""

import importlib

import pytest
import torch

from fairseq_mamba.ops import HAS_CUDA_CONV, causal_conv1d, causal_conv1d_reference, scan_kernel

conv_module = importlib.import_module("fairseq_mamba.ops.causal_conv1d")
both_impls = pytest.mark.usefixtures("impl")


@pytest.fixture(params=["kernel", "F.conv1d"])
def impl(request, monkeypatch):
    """causal_conv1d's CPU path: the compiled kernel, or (patched) the F.conv1d fallback."""
    if request.param == "F.conv1d":
        monkeypatch.setattr(conv_module, "conv_kernel_applies", lambda *args: False)
    elif scan_kernel.load_kernel() is None:
        if scan_kernel.os.environ.get("FAIRSEQ_MAMBA_SCAN_KERNEL") == "0":
            pytest.skip("FAIRSEQ_MAMBA_SCAN_KERNEL=0: the CPU kernels are switched off")
        pytest.fail("the CPU kernels did not build (see the logged warning)")
    return request.param


def make(batch=2, dim=5, length=17, width=4, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, length, generator=g)
    w = torch.randn(dim, width, generator=g)
    b = torch.randn(dim, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (x, w, b)]


def test_reference_by_hand():
    """out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + bias (width 3), zeros before t=0."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    w = torch.tensor([[0.5, -1.0, 2.0]])
    out = causal_conv1d_reference(x, w, torch.tensor([10.0]))
    expected = torch.tensor([[[12.0, 13.0, 14.5, 16.0]]])
    torch.testing.assert_close(out, expected)


@both_impls
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 64])
def test_matches_reference(length, width, with_bias, activation):
    x, w, b = make(length=length, width=width)
    b = b if with_bias else None
    out = causal_conv1d(x, w, b, activation)
    ref = causal_conv1d_reference(x, w, b, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(out)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad((out * go).sum(), params)
    ref_grads = torch.autograd.grad((ref * go).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [[1, 1, 1, 14], [2, 15], [8, 9], [17], [0, 5, 12]])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_streaming_matches_full(split, width):
    """Chunk by chunk with initial/final states == one call over the whole input,
    also for chunks shorter than width - 1 (and empty ones)."""
    x, w, b = (t.detach() for t in make(length=17, width=width))
    full = causal_conv1d(x, w, b, "silu")
    for fn in (causal_conv1d, causal_conv1d_reference):
        state = torch.zeros(2, 5, width - 1)
        outs, t0 = [], 0
        for size in split:
            out, state = fn(x[..., t0:t0 + size], w, b, "silu", initial_states=state,
                            return_final_states=True)
            outs.append(out)
            t0 += size
        torch.testing.assert_close(torch.cat(outs, -1), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state, x[..., 17 - (width - 1):])


def test_final_states_of_short_input_keep_old_frames():
    x, w, b = (t.detach() for t in make(length=1, width=4))
    init = torch.randn(2, 5, 3)
    _, final = causal_conv1d(x, w, b, initial_states=init, return_final_states=True)
    torch.testing.assert_close(final, torch.cat([init[..., 1:], x], -1))


@both_impls
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    """Outputs and gradients in the input's dtype, computed in fp32 (fp64 for fp64)."""
    x, w, b = make(dtype=dtype)
    out = causal_conv1d(x, w, b, "silu")
    ref = causal_conv1d_reference(x, w, b, "silu")
    assert out.dtype == ref.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), (x, w, b))
    ref_grads = torch.autograd.grad((ref * go).sum(), (x, w, b))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * 10)


@both_impls
def test_silu_of_non_finite_values_is_torchs():
    """inf -> inf, -inf -> -inf * 0 = nan, nan -> nan, and large finite values, as F.silu."""
    x = torch.zeros(1, 1, 8)
    x[0, 0, :5] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30])
    w, b = torch.ones(1, 1), torch.zeros(1)  # width 1: out = x (a zero tap would give 0 * inf)
    out = causal_conv1d(x, w, b, "silu")
    torch.testing.assert_close(out, torch.nn.functional.silu(x), equal_nan=True)


@both_impls
@pytest.mark.parametrize("layout", ["channel-major", "half of xz", "time-strided"])
def test_strided_inputs(layout):
    """Inputs as the mixer hands them over (one half of a "d (b l)" projection, or any
    view): the same values and gradients as the contiguous input."""
    x, w, b = (t.detach() for t in make(batch=3, dim=5, length=19))
    if layout == "channel-major":
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "half of xz":
        xs = torch.cat([x, torch.randn_like(x)], 1).transpose(0, 1).contiguous().transpose(0, 1)[:, :5]
    else:
        xs = torch.stack([x, x], -1)[..., 0]  # time stride 2: copied for the kernel
    assert torch.equal(xs, x)
    xs.requires_grad_()
    out = causal_conv1d(xs, w, b, "silu")
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, b, "silu"), rtol=1e-5, atol=1e-6)
    go = torch.randn_like(out)
    (dx,) = torch.autograd.grad((out * go).sum(), xs)
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((causal_conv1d_reference(xr, w, b, "silu") * go).sum(), xr)
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)


@both_impls
def test_batch_rows_are_independent():
    """A batch gives each row what that row gives alone (no frames leak between rows)."""
    x, w, b = (t.detach() for t in make(batch=4, length=23))
    out = causal_conv1d(x, w, b, "silu")
    for i in range(4):
        torch.testing.assert_close(out[i:i + 1], causal_conv1d(x[i:i + 1], w, b, "silu"),
                                   rtol=0, atol=0)


BAD = [
    (dict(x=torch.zeros(2, 5)), r"x must .*\(2, 5\)"),
    (dict(weight=torch.zeros(4, 4)), r"weight must .*\(4, 4\)"),
    (dict(weight=torch.zeros(5)), r"weight must .*\(5,\)"),
    (dict(bias=torch.zeros(4)), r"bias must .*\(4,\)"),
    (dict(activation="relu"), r"activation must .*'relu'"),
    (dict(initial_states=torch.zeros(2, 5, 2)), r"initial_states must .*\(2, 5, 2\)"),
]


@pytest.mark.parametrize("fn", [causal_conv1d, causal_conv1d_reference])
@pytest.mark.parametrize("change,match", BAD)
def test_bad_arguments_raise(fn, change, match):
    args = dict(x=torch.zeros(2, 5, 7), weight=torch.zeros(5, 4), bias=None, activation=None,
                initial_states=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fn(**args)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_CUDA_CONV,
                    reason="needs a GPU and the causal_conv1d CUDA kernel")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_kernel_matches_reference(dtype, tol):
    x, w, b = make(dim=64, length=257, dtype=dtype, device="cuda")
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu"),
                               causal_conv1d_reference(x, w, b, "silu"), rtol=tol, atol=tol)
