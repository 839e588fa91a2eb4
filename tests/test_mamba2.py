"""Mamba-2 mixers (mamba_version=2) in layers and models: padding, directions, streaming,
long-form, the kernel call site, configs."""
import collections

import pytest
import torch
from fairseq.models.hubert.hubert import HubertConfig, HubertModel

from fairseq_mamba import ops
from fairseq_mamba.inference.long_form import encode_long
from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel
from fairseq_mamba.modules import BIMAMBA_TYPES, ExternalBiMamba2, Mamba2, build_mixer_cls
from fairseq_mamba.inference.streaming import StreamingEncoder
from test_mamba_hubert_model import assert_padded_batch_equals_solo, build, model_from_yaml
from test_mamba_layer import DIM, MIXERS
from test_mamba_layer import make_layer as mamba_layer
from test_ssd_scan import stand_in
from test_streaming import full_pass, stream

MIXER = MIXERS[2]


def make_layer(bimamba_type, ffn=True, layer_norm_first=False, merge="concat"):
    return mamba_layer(bimamba_type, ffn, layer_norm_first, merge, version=2)


def build2(**overrides):
    return build(**{**dict(mamba_version=2, mamba_d_state=8, mamba_headdim=24, mamba_chunk_size=8), **overrides})


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_build_mixer_cls_builds_mamba2(bimamba_type):
    mixer = build_mixer_cls(bimamba_type, version=2, **MIXER)(DIM)
    expected = ExternalBiMamba2 if bimamba_type == "external" else Mamba2
    assert type(mixer) is expected
    with pytest.raises(ValueError, match="mamba_version=3"):
        build_mixer_cls(bimamba_type, version=3)


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
@pytest.mark.parametrize("length", [0, 1, 2])
def test_edge_lengths_and_gradients(bimamba_type, length):
    layer = make_layer(bimamba_type)
    x = torch.randn(length, 3, DIM, requires_grad=True)
    out, _ = layer(x, self_attn_padding_mask=torch.zeros(3, length, dtype=torch.bool))
    assert out.shape == (length, 3, DIM)
    (out * torch.randn(out.shape)).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    if length:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_forward_chunk_pieces_equal_one_pass(layer_norm_first):
    layer = make_layer("none", layer_norm_first=layer_norm_first)
    x = torch.randn(50, 2, DIM)
    with torch.no_grad():
        full, _ = layer(x)
        outs, state, start = [], None, 0
        for n in (1, 2, 3, 17, 27):
            out, state = layer.forward_chunk(x[start:start + n], state)
            outs.append(out)
            start += n
    assert (torch.cat(outs) - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="bimamba_type=none"):
        make_layer("internal").forward_chunk(x[:3])


def test_forward_chunk_is_exact_in_fp64():
    """Stream-vs-full differences in fp32 are rounding only (chunk boundaries move): in fp64
    one-frame chunks equal the chunked full pass to 1e-12."""
    layer = make_layer("none").double()
    x = torch.randn(40, 1, DIM, dtype=torch.float64)
    with torch.no_grad():
        full, _ = layer(x)
        outs, state = [], None
        for t in range(40):
            out, state = layer.forward_chunk(x[t:t + 1], state)
            outs.append(out)
    assert (torch.cat(outs) - full).abs().max().item() < 1e-12


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_forward_long_equals_forward(bimamba_type):
    layer = make_layer(bimamba_type)
    x = torch.randn(45, 1, DIM)
    with torch.no_grad():
        assert (layer.forward_long(x, chunk=7) - layer(x)[0]).abs().max().item() < 1e-5


def test_kernel_call_site_on_cpu():
    """The GPU branch (mamba_chunk_scan_combined) on CPU tensors: taken once per direction, same output."""
    layer = make_layer("internal")
    x = torch.randn(30, 2, DIM)
    calls = collections.Counter()
    with torch.no_grad():
        expected = layer(x)[0]
        with ops.use_kernels(ops.Kernels(mamba_chunk_scan_combined=stand_in(calls), device_type="cpu")):
            got = layer(x)[0]
    assert calls["mamba_chunk_scan_combined"] == 2
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_model_padded_waveform_batch_equals_each_utterance_alone(bimamba_type):
    model = build2(bimamba_type=bimamba_type).eval()
    assert all(isinstance(layer.mixer, (Mamba2, ExternalBiMamba2)) for layer in model.encoder.layers)
    assert_padded_batch_equals_solo(model, [torch.randn(1, n) for n in (8000, 5123, 3300)])


def test_causal_model_streams_and_encodes_long_form():
    torch.manual_seed(0)
    model = build2(bimamba_type="none", layer_norm_first=True).eval()
    wav = torch.randn(1, 8123)
    full = full_pass(model, wav)
    for sizes in ([320], [777], [4000, 13, 320, 1, 2999]):
        out = stream(StreamingEncoder(model), wav, sizes)
        assert out.shape == full.shape == (1, 25, 48)
        assert (out - full).abs().max().item() < 1e-5
    long = encode_long(model, wav[0], layers=[3], chunk_frames=6)[3]
    assert (long - full_pass(model, wav, output_layer=3)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("field,value,match", [
    ("mamba_version", 3, "mamba_version=3"),
    ("mamba_headdim", 5, "mamba_headdim=5"),
    ("mamba_ngroups", 3, "mamba_ngroups=3"),
    ("mamba_chunk_size", 0, "mamba_chunk_size=0"),
])
def test_bad_mamba2_sizes_fail_at_build_time_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        build2(**{field: value})


@pytest.mark.parametrize("name", ["mamba2_hubert_base_librispeech", "mamba2_hubert_causal_base_librispeech"])
def test_base_configs_are_within_ten_percent_of_hubert_base(name):
    ours = model_from_yaml(name, MambaHubertModel, MambaHubertConfig)
    stock = model_from_yaml("hubert_base_librispeech", HubertModel, HubertConfig)
    n_ours, n_stock = (sum(p.numel() for p in m.parameters()) for m in (ours, stock))
    print(f"parameters: {name} {n_ours:,}, hubert_base_librispeech {n_stock:,}")
    assert isinstance(ours.encoder.layers[0].mixer, (Mamba2, ExternalBiMamba2))
    assert len(ours.encoder.layers) == 12 and abs(n_ours / n_stock - 1) < 0.10
