"""The Mamba mixers and encoder layer: padding, directions, edge lengths, fairseq's layer contract."""
import pytest
import torch

from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.modules.mamba_mixer import lengths_from_padding_mask, reverse_within_lengths

DIM = 32


MIXERS = {1: dict(d_state=8, expand=2), 2: dict(d_state=8, expand=2, headdim=16, ngroups=2, chunk_size=8)}


def make_layer(bimamba_type, ffn=True, layer_norm_first=False, merge="concat", version=1):
    """A small layer of either Mamba version (Mamba-2: 4 heads of 16, 2 groups, chunks of 8)."""
    mixer_cls = build_mixer_cls(bimamba_type, merge=merge, version=version, **MIXERS[version])
    layer = MambaEncoderLayer(DIM, mixer_cls, ffn_dim=64 if ffn else 0, layer_norm_first=layer_norm_first)
    return layer.eval()


def padded_batch(lengths, garbage):
    """(time, batch, dim) batch, right-padded with ``garbage`` values, and its padding mask."""
    T = max(lengths)
    x = torch.full((T, len(lengths), DIM), garbage)
    mask = torch.ones(len(lengths), T, dtype=torch.bool)
    solo = []
    for b, n in enumerate(lengths):
        u = torch.randn(n, 1, DIM)
        x[:n, b] = u[:, 0]
        mask[b, :n] = False
        solo.append(u)
    return x, mask, solo


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
@pytest.mark.parametrize("garbage", [0.0, 1e4, float("nan"), float("inf")])
@pytest.mark.parametrize("ffn,layer_norm_first,merge", [(True, False, "concat"), (False, True, "sum")])
def test_padded_batch_equals_each_utterance_alone(bimamba_type, garbage, ffn, layer_norm_first, merge, version):
    layer = make_layer(bimamba_type, ffn, layer_norm_first, merge, version)
    lengths = [37, 5, 64, 1]
    x, mask, solo = padded_batch(lengths, garbage)
    with torch.no_grad():
        out, _ = layer(x, self_attn_padding_mask=mask)
        for b, (n, u) in enumerate(zip(lengths, solo)):
            alone, _ = layer(u)
            assert torch.isfinite(out[:n, b]).all()
            assert (out[:n, b] - alone[:, 0]).abs().max().item() < 1e-5, (bimamba_type, b)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bimamba_type", ["external", "internal"])
def test_backward_direction_sees_the_future_and_forward_does_not(bimamba_type, version):
    """Changing the last frame moves the first frame's output in bidirectional types only.

    (At initialisation Δ is small, so the far-reaching influence is small but clearly nonzero;
    in the causal type it must be exactly zero.)"""
    for btype in (bimamba_type, "none"):
        layer = make_layer(btype, version=version)
        x = torch.randn(20, 1, DIM)
        y = x.clone()
        y[-1] += 1.0
        with torch.no_grad():
            delta = (layer(x)[0][0] - layer(y)[0][0]).abs().max().item()
        if btype == "none":
            assert delta == 0.0
        else:
            assert delta > 1e-7, delta


def test_reverse_within_lengths_is_an_involution_that_keeps_padding_in_place():
    x = torch.arange(2 * 5).view(2, 5)
    lengths = torch.tensor([3, 5])
    r = reverse_within_lengths(x, lengths, dim=1)
    assert r.tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]
    assert torch.equal(reverse_within_lengths(r, lengths, dim=1), x)


def test_left_padding_is_refused_with_a_clear_error():
    mask = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="right-padded"):
        lengths_from_padding_mask(mask, 1, 3, "cpu")
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        lengths_from_padding_mask(torch.zeros(1, 2, dtype=torch.bool), 1, 3, "cpu")


def test_unknown_bimamba_type_names_the_value():
    with pytest.raises(ValueError, match="'sideways'"):
        build_mixer_cls("sideways")
    with pytest.raises(ValueError, match="'mean'"):
        build_mixer_cls("external", merge="mean")(DIM)


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
@pytest.mark.parametrize("length", [0, 1, 2])
def test_edge_lengths(bimamba_type, length):
    layer = make_layer(bimamba_type)
    x = torch.randn(length, 3, DIM, requires_grad=True)
    out, (attn, layer_result) = layer(x, self_attn_padding_mask=torch.zeros(3, length, dtype=torch.bool))
    assert out.shape == (length, 3, DIM) and attn is None and layer_result.shape == (length, 3, DIM)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
def test_gradients_do_not_flow_from_padding(bimamba_type):
    layer = make_layer(bimamba_type).train()
    layer.dropout1.p = 0.0
    x, mask, _ = padded_batch([9, 4], 0.0)
    x.requires_grad_(True)
    out, _ = layer(x, self_attn_padding_mask=mask)
    # the valid frames of utterance 1 only, randomly weighted: a plain sum of a post-norm layer's output
    # has zero gradient (LayerNorm's outputs sum to a constant), so only round-off could be nonzero
    (out[:4, 1] * torch.randn(4, DIM)).sum().backward()
    assert x.grad[4:, 1].abs().max().item() == 0.0  # its padding gets no gradient
    assert x.grad[:, 0].abs().max().item() == 0.0  # nor does the other utterance
    assert x.grad[:4, 1].abs().max().item() > 0.0
