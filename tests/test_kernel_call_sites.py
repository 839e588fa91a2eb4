"""The GPU branch of every op and layer, run on CPU: kernels replaced by the packages' references.

``ops.use_kernels(reference_kernels(calls))`` makes the dispatch take each kernel call exactly as
on a GPU (same arguments, order, layouts, dtypes); the stand-ins check each kernel's dtype and
layout contract and compute with mamba-ssm's ``selective_scan_ref`` / ``mamba_inner_ref`` (and our
conv reference with ``causal_conv1d_fn``'s API). Every result is compared with the PyTorch path.
"""
import collections

import pytest
import torch

from fairseq_mamba import ops
from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.ops.reference_kernels import KernelContractError, reference_kernels

from conftest import load_run_script

DIM = 32
# Kernel path vs PyTorch path: fp32 differs by summation order only; fp64 runs our fp64 scan.
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
# Which kernels one forward takes: the fused kernel per causal Mamba (mamba_inner_ref calls the
# conv and scan stand-ins inside it), else conv + scan per direction.
EXPECTED_CALLS = {
    "none": {"mamba_inner_fn": 1, "causal_conv1d_fn": 1, "selective_scan_fn": 1},
    "external": {"mamba_inner_fn": 2, "causal_conv1d_fn": 2, "selective_scan_fn": 2},
    "internal": {"causal_conv1d_fn": 2, "selective_scan_fn": 2},
}


def make_layer(bimamba_type, dtype=torch.float32):
    mixer_cls = build_mixer_cls(bimamba_type, d_state=8, expand=2)
    layer = MambaEncoderLayer(DIM, mixer_cls, ffn_dim=64, dropout=0.0).to(dtype)
    for p in layer.parameters():  # away from the init, so every parameter matters
        p.data.add_(0.05 * torch.randn_like(p))
    return layer.train()


def padded_batch(lengths, dtype, garbage=float("nan")):
    """(time, batch, dim) right-padded with ``garbage``, and its padding mask."""
    T = max(lengths)
    x = torch.randn(T, len(lengths), DIM, dtype=dtype)
    mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    return x.masked_fill(mask.t()[..., None], garbage), mask


def forward_backward(layer, x, mask):
    """Output on valid frames and the gradients of the input and every parameter."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out, _ = layer(x, self_attn_padding_mask=mask)
    valid = ~mask.t()[..., None]
    loss = (out.float().masked_fill(~valid, 0.0) * torch.linspace(-1, 1, DIM)).sum()
    loss.backward()
    grads = {"x": x.grad.masked_fill(~valid, 0.0)}
    grads.update({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    return out.detach().masked_fill(~valid, 0.0), grads


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_dispatch_chooses_per_device_dtype_state_and_width():
    x = torch.randn(2, 8, 5)
    stand_ins = reference_kernels()
    assert ops.kernel_for("selective_scan", x) is None  # the installed kernels never run on CPU
    with ops.use_kernels(stand_ins):
        assert ops.kernel_for("selective_scan", x) is stand_ins.selective_scan_fn
        assert ops.kernel_for("selective_scan", x, stateful=True) is None
        assert ops.kernel_for("selective_scan", x.double()) is None  # no fp64 kernel
        assert ops.kernel_for("causal_conv1d", x, conv_width=4) is stand_ins.causal_conv1d_fn
        assert ops.kernel_for("causal_conv1d", x, conv_width=5) is None
        assert ops.kernel_for("mamba_inner", x) is stand_ins.mamba_inner_fn
        with ops.use_kernels(ops.NO_KERNELS):
            assert ops.kernel_for("selective_scan", x) is None
    without_conv = ops.Kernels(stand_ins.selective_scan_fn, stand_ins.mamba_inner_fn, None, "cpu")
    with ops.use_kernels(without_conv):  # mamba_inner_fn asserts without causal_conv1d
        assert ops.kernel_for("mamba_inner", x) is None
    with pytest.raises(ValueError, match="'scan'"):
        ops.kernel_for("scan", x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_layer_kernel_path_matches_pytorch_path(bimamba_type, dtype):
    """Padded batch with garbage padding: outputs and all gradients of the two paths agree.

    (Finite garbage: NaN padding poisons the gradients of either path through fairseq's
    post-norm LayerNorm on padded frames; the forward with NaN padding is checked below.)"""
    layer = make_layer(bimamba_type, dtype)
    x, mask = padded_batch([23, 9, 1], dtype, garbage=1e4)
    with ops.use_kernels(ops.NO_KERNELS):
        ref_out, ref_grads = forward_backward(layer, x, mask)
    calls = collections.Counter()
    with ops.use_kernels(reference_kernels(calls, fp64=dtype == torch.float64)):
        out, grads = forward_backward(layer, x, mask)
    assert dict(calls) == EXPECTED_CALLS[bimamba_type]
    assert torch.isfinite(out).all() and rel_err(out, ref_out) < TOL[dtype]
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.isfinite(g).all() and rel_err(g, ref_grads[name]) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_and_conv_ops_through_kernels_match_pytorch(dtype):
    """The op-level call sites, with return_last_state (the streaming state the kernel offers)."""
    b, d, n, L = 2, 16, 8, 33
    u, delta, z = (torch.randn(b, d, L, dtype=dtype, requires_grad=True) for _ in range(3))
    B, C = (torch.randn(b, n, L, dtype=dtype, requires_grad=True) for _ in range(2))
    A = -torch.rand(d, n).add(0.5).requires_grad_()
    D, bias = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    w, wb = torch.randn(d, 4, dtype=dtype), torch.randn(d, dtype=dtype)
    inputs = (u, delta, z, B, C, A, D, bias)

    def run():
        x = ops.causal_conv1d(u, w, wb, activation="silu")
        out, last = ops.selective_scan(x, delta, A, B, C, D, z=z, delta_bias=bias,
                                       delta_softplus=True, return_last_state=True)
        # randn(shape), not randn_like: the same cotangent whatever the output's layout
        grads = torch.autograd.grad((out * torch.randn(out.shape, dtype=out.dtype)).sum(), inputs)
        return out, last, grads

    torch.manual_seed(1)
    ref = run()
    calls = collections.Counter()
    with ops.use_kernels(reference_kernels(calls, fp64=dtype == torch.float64)):
        torch.manual_seed(1)
        got = run()
    assert dict(calls) == {"causal_conv1d_fn": 1, "selective_scan_fn": 1}
    assert rel_err(got[0], ref[0]) < TOL[dtype] and rel_err(got[1], ref[1]) < TOL[dtype]
    for g, r in zip(got[2], ref[2]):
        assert rel_err(g, r) < TOL[dtype]


def test_streaming_first_chunk_takes_the_kernel_and_continues_exactly():
    """A stream's first chunk (no state yet) goes through selective_scan_fn; the next ones,
    with a state the kernel cannot take, through PyTorch; both equal the PyTorch stream."""
    layer = make_layer("none").eval()
    x = torch.randn(30, 2, DIM)
    with torch.no_grad(), ops.use_kernels(ops.NO_KERNELS):
        y1, s1 = layer.forward_chunk(x[:17])
        y2, s2 = layer.forward_chunk(x[17:], s1)
    calls = collections.Counter()
    with torch.no_grad(), ops.use_kernels(reference_kernels(calls)):
        k1, t1 = layer.forward_chunk(x[:17])
        assert dict(calls) == {"selective_scan_fn": 1}
        k2, t2 = layer.forward_chunk(x[17:], t1)
    assert dict(calls) == {"selective_scan_fn": 1}
    assert t1[1].dtype == torch.float32 and rel_err(t1[1], s1[1]) < 1e-5
    assert rel_err(k1, y1) < 1e-5 and rel_err(k2, y2) < 1e-5 and rel_err(t2[1], s2[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_half_model_meets_the_kernels_dtype_contract(bimamba_type, dtype):
    """A model cast as common.fp16/bf16 casts it: every kernel call passes the dtype checks
    (A, D, Δ bias fp32; the rest in the model's dtype), the SSM parameters stay fp32, and the
    output follows the fp32 model's."""
    layer = make_layer(bimamba_type).eval()
    x, mask = padded_batch([40, 12], torch.float32)
    with torch.no_grad(), ops.use_kernels(ops.NO_KERNELS):
        ref, _ = layer(x, self_attn_padding_mask=mask)
    layer.to(dtype)
    kept = {n: p.dtype for n, p in layer.named_parameters() if n.endswith(("A_log", ".D", "dt_proj.bias"))}
    assert kept and set(kept.values()) == {torch.float32}, kept
    assert layer.fc1.weight.dtype == dtype
    calls = collections.Counter()
    with torch.no_grad(), ops.use_kernels(reference_kernels(calls)):
        out, _ = layer(x.to(dtype), self_attn_padding_mask=mask)
    assert dict(calls) == EXPECTED_CALLS[bimamba_type]
    valid = ~mask.t()
    assert out.dtype == dtype and rel_err(out[valid], ref[valid]) < 3e-2


def test_stand_ins_reject_what_the_kernels_reject():
    """The contract checks are live: a half A, an fp64 input, a bias unlike its weight."""
    kernels = reference_kernels()
    u = torch.randn(1, 8, 5)
    B = torch.randn(1, 4, 5)
    with pytest.raises(KernelContractError, match="A must be fp32"):
        kernels.selective_scan_fn(u, u, -torch.ones(8, 4).half(), B, B)
    with pytest.raises(KernelContractError, match="float64"):
        kernels.selective_scan_fn(u.double(), u.double(), -torch.ones(8, 4), B.double(), B.double())
    with pytest.raises(KernelContractError, match="bias dtype"):
        kernels.causal_conv1d_fn(u, torch.randn(8, 4), torch.randn(8).half())
    with pytest.raises(KernelContractError, match="divisible by 8"):
        kernels.causal_conv1d_fn(torch.randn(1, 5, 12).transpose(1, 2), torch.randn(12, 4))


def test_gpu_check_parity_and_speed_steps_run_on_cpu():
    """run_scripts/gpu_check.py's --cpu-dry-run steps at tiny sizes (its training step is
    tests/test_half_precision.py's): every parity row passes and the report renders."""
    gpu_check = load_run_script("gpu_check")
    size = dict(gpu_check.SIZES["cpu"], speed=(20,))
    kernels = reference_kernels()
    results = dict(environment=gpu_check.environment("cpu"), train=[], seconds=0.0,
                   scan=gpu_check.scan_parity(kernels, "cpu", size["scan"]),
                   layers=gpu_check.layer_parity(kernels, "cpu", size),
                   speed=gpu_check.speed("cpu", size))
    assert len(results["scan"]) == 2 and len(results["layers"]) == 2 * len(BIMAMBA_TYPES)
    assert all(r["ok"] and r["kernel_calls"] for r in results["scan"] + results["layers"])
    assert {r["layer"].split()[0] for r in results["speed"]} == {"attention", "mamba"}
    md, ok = gpu_check.report(results, dry_run=True)
    assert ok and "all checks passed" in md and "| mamba bimamba_type=external | 20 |" in md
