"""StreamingEncoder: chunk-by-chunk features of a causal mamba_hubert equal the full pass."""
import pytest
import torch
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_mamba.modules import MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.inference.streaming import StreamingEncoder
from test_mamba_hubert_model import build

TOL = 1e-5  # fp32, as the issue asks
SAMPLES = 8000 + 123  # 25 frames and a ragged tail that the full pass drops too


def causal_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build(bimamba_type="none", **overrides).eval()


def full_pass(model, wav, output_layer=None):
    with torch.no_grad():
        return model.extract_features(wav, output_layer=output_layer)[0]


def stream(encoder, wav, sizes):
    """Feed wav (batch, samples) in chunks of ``sizes`` (cycled), then flush; concatenated output."""
    encoder.reset()
    outs, start, k = [], 0, 0
    while start < wav.shape[-1]:
        n = sizes[k % len(sizes)]
        outs.append(encoder.forward_chunk(wav[:, start:start + n]))
        start, k = start + n, k + 1
    outs.append(encoder.flush())
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def models():
    return {lnf: causal_model(layer_norm_first=lnf) for lnf in (False, True)}


@pytest.fixture(scope="module")
def wav():
    return torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(1))


CHUNKINGS = {
    "one_frame_320": [320],
    "receptive_field_400": [400],
    "odd_777": [777],
    "whole": [SAMPLES],
    "mixed_odd": [4000, 13, 320, 1, 2999],
}


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("output_layer", [None, 2])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_stream_equals_full_pass(models, wav, chunking, layer_norm_first, output_layer):
    model = models[layer_norm_first]
    full = full_pass(model, wav, output_layer)
    out = stream(StreamingEncoder(model, output_layer=output_layer), wav, CHUNKINGS[chunking])
    assert out.shape == full.shape == (1, 25, 48)
    assert (out - full).abs().max().item() < TOL


def test_one_sample_chunks_equal_full_pass(models, wav):
    """The smallest chunking (every conv layer waits for its next input sample), on one variant:
    8123 chunks per stream, so the 2 x 2 variant matrix above leaves it out."""
    full = full_pass(models[True], wav, output_layer=2)
    out = stream(StreamingEncoder(models[True], output_layer=2), wav, [1])
    assert out.shape == full.shape == (1, 25, 48)
    assert (out - full).abs().max().item() < TOL


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_random_chunk_sizes_equal_full_pass(models, wav, sizes):
    full = full_pass(models[False], wav)
    out = stream(StreamingEncoder(models[False]), wav, sizes)
    assert out.shape == full.shape
    assert (out - full).abs().max().item() < TOL


@pytest.mark.parametrize("overrides", [
    dict(conv_pos=15),  # odd kernel: no SamePad trim, lookahead 7
    dict(conv_pos_batch_norm=True),  # BatchNorm before the positional conv
    dict(encoder_layers=1, mamba_ffn=False, mamba_d_conv=2),
])
def test_variants_and_batched_streams_equal_full_pass(overrides):
    model = causal_model(**overrides)
    for m in model.modules():  # make eval-mode BatchNorm a real per-channel affine
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    wav = torch.randn(2, 6000)
    out = stream(StreamingEncoder(model), wav, [320, 1111])
    full = full_pass(model, wav)
    assert out.shape == full.shape
    assert (out - full).abs().max().item() < TOL


def test_a_frame_is_emitted_once_its_lookahead_has_arrived(models, wav):
    encoder = StreamingEncoder(models[False])
    lookahead = 16 // 2 - 1  # conv_pos=16: frame t reads frames t-8 .. t+7
    assert encoder.lookahead_frames == lookahead
    assert encoder.lookahead_seconds == pytest.approx(lookahead * 0.02)
    receptive, hop = 400, 320
    fed = 0
    for frames in range(1, 26):
        need = (frames - 1) * hop + receptive  # samples that complete `frames` conv frames
        encoder.forward_chunk(wav[:, fed:need])
        fed = need
        assert encoder.frames_emitted == max(0, frames - lookahead)
    assert encoder.flush().shape[1] == lookahead and encoder.frames_emitted == 25


def test_reset_starts_over_and_misuse_is_refused(models, wav):
    encoder = StreamingEncoder(models[False])
    first = stream(encoder, wav, [640])
    assert torch.equal(stream(encoder, wav, [640]), first)
    with pytest.raises(ValueError, match="reset"):
        encoder.forward_chunk(wav[:, :320])
    with pytest.raises(ValueError, match="reset"):
        encoder.flush()
    encoder.reset()
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        encoder.forward_chunk(torch.zeros(1, 1, 320))
    with pytest.raises(ValueError, match="output_layer=4"):
        StreamingEncoder(models[False], output_layer=4)
    assert StreamingEncoder(models[False]).flush().shape[1] == 0  # an empty stream


@pytest.mark.parametrize("bimamba_type", ["external", "internal"])
def test_bidirectional_models_are_refused(bimamba_type):
    with pytest.raises(ValueError, match="bidirectional.*bimamba_type=none"):
        StreamingEncoder(build(bimamba_type=bimamba_type))


def test_group_norm_extractor_and_attention_are_refused():
    with pytest.raises(ValueError, match="GroupNorm.*extractor_mode=layer_norm"):
        StreamingEncoder(build(bimamba_type="none", extractor_mode="default"))
    with pytest.raises(ValueError, match="self-attention"):
        StreamingEncoder(build(HubertModel, HubertConfig, encoder_attention_heads=4))


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_layer_forward_chunk_pieces_equal_one_pass(layer_norm_first):
    layer = MambaEncoderLayer(32, build_mixer_cls("none", d_state=8), ffn_dim=64,
                              layer_norm_first=layer_norm_first).eval()
    x = torch.randn(50, 2, 32)
    with torch.no_grad():
        full, _ = layer(x)
        outs, state, start = [], None, 0
        for n in (1, 2, 3, 17, 27):
            out, state = layer.forward_chunk(x[start:start + n], state)
            outs.append(out)
            start += n
    assert (torch.cat(outs) - full).abs().max().item() < TOL


def test_bidirectional_mixer_refuses_forward_chunk():
    layer = MambaEncoderLayer(32, build_mixer_cls("internal", d_state=8), ffn_dim=0)
    with pytest.raises(ValueError, match="bimamba_type=none"):
        layer.forward_chunk(torch.randn(3, 1, 32))
