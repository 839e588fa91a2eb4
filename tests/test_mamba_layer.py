"""The Mamba mixers and encoder layer: padding, directions, edge lengths, fairseq's layer contract."""
import pytest
import torch

from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.modules.mamba_mixer import (
    ExternalBiMamba, lengths_from_padding_mask, reverse_within_lengths)

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


@pytest.mark.parametrize("length,folds", [(11, False), (30, True)])  # 3 x 30 frames > d_inner 64
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("out_bias", [False, True])
def test_external_merge_with_folded_out_projs_is_the_papers_composition(
        out_bias, padded, length, folds, monkeypatch):
    """ExternalBiMamba folds each Mamba's out_proj into its half of the merge Linear (where
    the batch has more frames than d_inner): the same outputs and parameter gradients as
    merge(cat(Mamba_f(x), rev(Mamba_b(rev(x)))))."""
    calls = []
    merged = ExternalBiMamba._merged_forward
    monkeypatch.setattr(ExternalBiMamba, "_merged_forward",
                        lambda *args: calls.append(1) or merged(*args))
    torch.manual_seed(0)
    mixer = ExternalBiMamba(DIM, merge="concat", d_state=8, expand=2, bias=out_bias).double()
    x = torch.randn(3, length, DIM, dtype=torch.double)
    mask = torch.zeros(3, length, dtype=torch.bool)
    if padded:
        mask[0, 7:] = mask[2, 4:] = True
    lengths = lengths_from_padding_mask(mask, 3, length, "cpu")
    rev = lambda t: reverse_within_lengths(t, lengths, dim=1)  # noqa: E731
    outs, grads = [], []
    for composed in (False, True):
        out = (mixer.merge(torch.cat([mixer.forward_mamba(x, mask),
                                      rev(mixer.backward_mamba(rev(x), mask))], -1))
               if composed else mixer(x, mask))
        outs.append(out)
        grads.append(torch.autograd.grad(out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)
                                                 .double()).sum(), list(mixer.parameters())))
    assert len(calls) == folds
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_reverse_without_lengths_is_a_flip():
    x = torch.arange(10.0).view(2, 5)
    assert lengths_from_padding_mask(torch.zeros(2, 5, dtype=torch.bool), 2, 5, "cpu") is None
    assert torch.equal(reverse_within_lengths(x, None, dim=1), x.flip(1))


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
