"""causal_hubert: stock HuBERT with causal self-attention; causality, padding, streaming."""
import pytest
import torch
from fairseq.models.hubert.hubert import HubertModel

from fairseq_mamba.models.causal_hubert import CausalHubertConfig, CausalHubertModel
from fairseq_mamba.modules import CausalTransformerLayer
from fairseq_mamba.modules.causal_attention import causal_mask
from fairseq_mamba.inference.streaming import StreamingEncoder
from test_mamba_hubert_model import build
from test_streaming import CHUNKINGS, SAMPLES, TOL, full_pass, stream


def causal_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build(CausalHubertModel, CausalHubertConfig, encoder_attention_heads=4, **overrides).eval()


@pytest.fixture(scope="module")
def models():
    return {lnf: causal_model(layer_norm_first=lnf) for lnf in (False, True)}


@pytest.fixture(scope="module")
def wav():
    return torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(1))


def test_causal_mask_values():
    assert causal_mask(2, 3, "cpu").tolist() == [[False] * 4 + [True], [False] * 5]


def test_is_a_stock_hubert_with_causal_layers(models):
    model = models[False]
    assert isinstance(model, HubertModel) and len(model.encoder.layers) == 3
    assert all(isinstance(layer, CausalTransformerLayer) for layer in model.encoder.layers)
    stock = build(HubertModel, encoder_attention_heads=4, cfg_cls=CausalHubertConfig)
    assert model.state_dict().keys() == stock.state_dict().keys()


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_encoder_output_ignores_the_future(models, layer_norm_first):
    """Changing encoder inputs from frame 10 on leaves outputs 0..9 as they were (the positional
    conv, outside the layers, is bypassed here: it is the one non-causal part, see streaming)."""
    encoder = models[layer_norm_first].encoder
    x = torch.randn(20, 2, 48)
    y = x.clone()
    y[10:] = torch.randn(10, 2, 48)
    with torch.no_grad():
        for layer in encoder.layers:
            x, y = layer(x)[0], layer(y)[0]
    assert (x[:10] - y[:10]).abs().max().item() < TOL
    assert (x[10:] - y[10:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_stream_equals_full_pass(models, wav, chunking, layer_norm_first):
    model = models[layer_norm_first]
    full = full_pass(model, wav)
    out = stream(StreamingEncoder(model), wav, CHUNKINGS[chunking])
    assert out.shape == full.shape == (1, 25, 48)
    assert (out - full).abs().max().item() < TOL


def test_one_sample_chunks_and_output_layer(models, wav):
    full = full_pass(models[True], wav, output_layer=2)
    out = stream(StreamingEncoder(models[True], output_layer=2), wav, [1])
    assert out.shape == full.shape == (1, 25, 48)
    assert (out - full).abs().max().item() < TOL


def test_batched_stream_and_reset(models):
    encoder = StreamingEncoder(models[False])
    wav = torch.randn(2, 6000)
    first = stream(encoder, wav, [320, 1111])
    assert (first - full_pass(models[False], wav)).abs().max().item() < TOL
    assert torch.equal(stream(encoder, wav, [320, 1111]), first)  # reset drops the KV cache


def test_non_transformer_layer_type_is_refused():
    with pytest.raises(ValueError, match="layer_type='conformer'"):
        causal_model(layer_type="conformer")
