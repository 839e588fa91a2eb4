"""Property tests (hypothesis): the chunked scan and the CPU kernel equal the reference loop, and a padded batch
equals each utterance run alone, over random sizes. Bounded example counts keep this file fast.

test_selective_scan.py already has an fp64 property test of the public ``selective_scan``; here the
chunked scan and the compiled CPU kernel run in fp32 with random chunk sizes, groups and initial
states, so chunk and io-chunk boundaries fall everywhere.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel
from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.ops import selective_scan_reference
from fairseq_mamba.ops.chunked_scan import ChunkedSelectiveScan
from fairseq_mamba.ops.scan_kernel import KernelSelectiveScan, load_kernel

from fairseq.data import Dictionary
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from test_mamba_hubert_model import assert_padded_batch_equals_solo

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(actual, expected):
    """max|actual - expected| / max|expected|; 0 for empty tensors (length 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def scan_impl(name):
    """apply(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, h0) of either CPU path."""
    if name == "chunked":
        return ChunkedSelectiveScan.apply
    assert load_kernel() is not None, "the CPU selective-scan kernel did not build"
    return lambda *args: KernelSelectiveScan.apply(*args[:9], args[10], args[9])


@pytest.mark.parametrize("impl", ["chunked", "kernel"])
@settings(max_examples=30, **SETTINGS)
@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 2]), dims_per_group=st.integers(1, 3),
       d_state=st.integers(1, 6), length=st.integers(0, 150), chunk=st.sampled_from([1, 3, 16, 64]),
       with_h0=st.booleans(), softplus=st.booleans(), seed=st.integers(0, 2**16))
def test_scan_equals_reference_loop(impl, batch, groups, dims_per_group, d_state, length, chunk,
                                    with_h0, softplus, seed):
    """Outputs, last state and every gradient within 1e-5 (relative to the reference's max), or within
    4x the fp32 reference's own error where a gradient is a long sum that cancels (its fp32 round-off,
    relative to the small result, can exceed 1e-5 in any summation order: D's 2.2e-5 at seed 6370)."""
    g = torch.Generator().manual_seed(seed)
    dim = groups * dims_per_group
    x = dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5 - (1.0 if softplus else -0.5),
        A=-torch.exp(torch.randn(dim, d_state, generator=g)),
        B=torch.randn(batch, groups, d_state, length, generator=g),
        C=torch.randn(batch, groups, d_state, length, generator=g),
        D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.3,
        initial_state=torch.randn(batch, dim, d_state, generator=g) if with_h0 else None,
    )
    if not softplus:
        # raw Δ + bias must be positive, or the state grows without bound (inf in every path)
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs()
    x = {k: None if v is None else v.requires_grad_() for k, v in x.items()}
    names = [k for k, v in x.items() if v is not None]
    weights = torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, d_state, generator=g)

    def outputs_and_grads(inputs, out, last):
        loss = (out * weights[0].to(out)).sum() + (last * weights[1].to(last)).sum()
        if not loss.requires_grad:  # length 0 without an initial state: nothing depends on inputs
            return (out, last), [torch.zeros_like(inputs[k]) for k in names]
        grads = torch.autograd.grad(loss, [inputs[k] for k in names], allow_unused=True,
                                    materialize_grads=True)
        return (out, last), grads

    got = outputs_and_grads(x, *scan_impl(impl)(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], softplus, chunk,
        x["initial_state"]))
    # the ground truth: the sequential reference in fp64 (an fp32 reference has round-off of its own,
    # in another summation order, which the comparison would count against the path under test)
    x64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in x.items()}
    want = outputs_and_grads(x64, *selective_scan_reference(**x64, delta_softplus=softplus, return_last_state=True))
    x32 = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in x.items()}
    ref32 = outputs_and_grads(x32, *selective_scan_reference(**x32, delta_softplus=softplus, return_last_state=True))
    for a, b, r, what in zip((*got[0], *got[1]), (*want[0], *want[1]), (*ref32[0], *ref32[1]), ["out", "last", *names]):
        assert a.shape == b.shape and torch.isfinite(a).all(), what
        assert rel_err(a, b) <= max(1e-5, 4 * rel_err(r, b)), (what, rel_err(a, b), rel_err(r, b))


@settings(max_examples=25, **SETTINGS)
@given(bimamba_type=st.sampled_from(BIMAMBA_TYPES), layer_norm_first=st.booleans(),
       lengths=st.lists(st.integers(1, 48), min_size=1, max_size=5),
       garbage=st.sampled_from([0.0, -3e4, float("nan"), float("inf")]), seed=st.integers(0, 2**16))
def test_padded_layer_batch_equals_each_utterance_alone(bimamba_type, layer_norm_first, lengths,
                                                        garbage, seed):
    torch.manual_seed(seed)
    dim = 16
    layer = MambaEncoderLayer(dim, build_mixer_cls(bimamba_type, d_state=4, expand=2), ffn_dim=32,
                              layer_norm_first=layer_norm_first).eval()
    x = torch.full((max(lengths), len(lengths), dim), garbage)
    mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    solos = [torch.randn(n, 1, dim) for n in lengths]
    for b, solo in enumerate(solos):
        x[: len(solo), b], mask[b, : len(solo)] = solo[:, 0], False
    with torch.no_grad():
        out, _ = layer(x, self_attn_padding_mask=mask)
        for b, solo in enumerate(solos):
            alone, _ = layer(solo)
            assert torch.isfinite(out[: len(solo), b]).all()
            assert (out[: len(solo), b] - alone[:, 0]).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def tiny_models():
    """One small MambaHubertModel per bimamba_type (layer_norm extractor: batch-consistent)."""
    dictionary = Dictionary()
    for i in range(10):
        dictionary.add_symbol(str(i))
    torch.manual_seed(0)
    cfg = dict(label_rate=50, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
               conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", conv_pos=16,
               conv_pos_groups=4, extractor_mode="layer_norm", final_dim=16)
    return {t: MambaHubertModel(MambaHubertConfig(**cfg, bimamba_type=t),
                                HubertPretrainingConfig(label_rate=50), [dictionary]).eval()
            for t in BIMAMBA_TYPES}


@settings(max_examples=15, **SETTINGS)
@given(bimamba_type=st.sampled_from(BIMAMBA_TYPES),
       lengths=st.lists(st.integers(400, 6000), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_padded_waveform_batch_equals_each_utterance_alone(tiny_models, bimamba_type, lengths, seed):
    """From samples to features: every valid frame of every row equals the solo run (1e-5)."""
    model = tiny_models[bimamba_type]
    g = torch.Generator().manual_seed(seed)
    assert_padded_batch_equals_solo(model, [torch.randn(1, n, generator=g) for n in lengths])
