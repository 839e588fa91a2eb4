"""hubert_ctc_head (the paper's extra module between encoder and CTC): equal to hubert_ctc without
a head, batch-consistent with every head type, feature_layer, the per-layer outputs for the MI
analysis, and bad sizes named."""
import pytest
import torch
from omegaconf import OmegaConf

import fairseq_mamba  # noqa: F401  (registers the models)
from fairseq import tasks
from fairseq.modules.conformer_layer import ConformerWav2Vec2EncoderLayer

from fairseq_mamba.models.hubert_ctc_head import HEAD_TYPES, MaskedConformerLayer

from conftest import REPO, write_tiny_dataset
from test_layer_mi import write_checkpoint

LETTERS = "ABCDE|"


def add_letter_targets(root, seed=0):
    """{split}.ltr and dict.ltr.txt beside a tiny dataset's manifests."""
    gen = torch.Generator().manual_seed(seed)
    for split in ("train", "valid"):
        n = len((root / f"{split}.tsv").read_text().splitlines()) - 1
        lines = [" ".join(LETTERS[i] for i in torch.randint(0, 5, (6,), generator=gen)) + " |" for _ in range(n)]
        (root / f"{split}.ltr").write_text("\n".join(lines) + "\n")
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in LETTERS))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = add_letter_targets(write_tiny_dataset(tmp_path_factory.mktemp("head"), n_train=3, n_valid=1))
    return root, {m: write_checkpoint(root / f"{m}.pt", m, root) for m in ("mamba_hubert", "hubert")}


def build(pretrained, model="mamba_hubert", config="head_tiny_cpu", **fields):
    """A fine-tuning model as fairseq-hydra-train builds it from examples/finetune/CONFIG.yaml."""
    root, ckpts = pretrained
    cfg = OmegaConf.load(REPO / "examples" / "finetune" / f"{config}.yaml")
    cfg.task.data = cfg.task.label_dir = str(root)
    cfg.model.update(w2v_path=ckpts[model], normalize=True, data=str(root), **fields)
    torch.manual_seed(0)
    return tasks.setup_task(cfg.task).build_model(cfg.model).eval()


def padded_batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), max(lengths), generator=gen)
    pad = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return wav.masked_fill(pad, 1e3), pad  # loud garbage in the padding


@pytest.mark.parametrize("model_name", ["mamba_hubert", "hubert"])
def test_no_head_is_hubert_ctc_bit_for_bit(pretrained, model_name):
    head = build(pretrained, model_name, head_layers=0)
    plain = build(pretrained, model_name, config="hubert_tiny_cpu")
    plain.load_state_dict(head.state_dict())
    wav, pad = padded_batch([9000, 7000])
    with torch.no_grad():
        a, b = head(source=wav, padding_mask=pad), plain(source=wav, padding_mask=pad)
    assert torch.equal(a["encoder_out"], b["encoder_out"])
    assert torch.equal(a["padding_mask"], b["padding_mask"])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_padded_batch_gives_each_utterance_its_solo_output(pretrained, head_type):
    model = build(pretrained, head_type=head_type, head_layers=2)
    assert len(model.w2v_encoder.head) == 2
    lengths = [9600, 6400, 4800]
    wav, pad = padded_batch(lengths)
    with torch.no_grad():
        batch = model(source=wav, padding_mask=pad)
        for i, n in enumerate(lengths):
            solo = model(source=wav[i:i + 1, :n], padding_mask=None)["encoder_out"][:, 0]
            got = batch["encoder_out"][: solo.shape[0], i]
            assert not batch["padding_mask"][i, : solo.shape[0]].any() and batch["padding_mask"][i, solo.shape[0]:].all()
            assert (got - solo).abs().max() < 1e-5, (head_type, i)


def test_fairseqs_conformer_reads_padding_and_ours_does_not():
    torch.manual_seed(0)
    stock = ConformerWav2Vec2EncoderLayer(32, 64, 4, 0.0, use_fp16=False, depthwise_conv_kernel_size=15).eval()
    ours = MaskedConformerLayer(32, 64, 4, 0.0, use_fp16=False, depthwise_conv_kernel_size=15).eval()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(40, 2, 32)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 25:] = True
    x[25:, 1] = 100.0
    with torch.no_grad():
        solo = stock(x[:25, 1:2])[0][:, 0]
        assert (stock(x, self_attn_padding_mask=pad)[0][:25, 1] - solo).abs().max() > 1e-2
        assert (ours(x, self_attn_padding_mask=pad)[0][:25, 1] - solo).abs().max() < 1e-5
        assert torch.equal(ours(x[:25, 1:2])[0], stock(x[:25, 1:2])[0])  # no padding: fairseq's layer


def test_feature_layer_feeds_that_encoder_layer_and_drops_the_rest(pretrained):
    model = build(pretrained, head_layers=0, feature_layer=1)
    full = build(pretrained, config="hubert_tiny_cpu")
    assert len(model.w2v_encoder.w2v_model.encoder.layers) == 1 < len(full.w2v_encoder.w2v_model.encoder.layers)
    wav = torch.randn(1, 8000)
    model.w2v_encoder.proj.load_state_dict(full.w2v_encoder.proj.state_dict())
    with torch.no_grad():
        feats, _ = full.w2v_encoder.w2v_model.extract_features(wav, output_layer=1)
        out = model(source=wav, padding_mask=None)["encoder_out"][:, 0]
    assert torch.allclose(out, full.w2v_encoder.proj(feats[0]), atol=1e-6)


@pytest.mark.parametrize("model_name", ["mamba_hubert", "hubert"])
def test_layer_outputs_are_input_encoder_layers_then_head_layers(pretrained, model_name):
    model = build(pretrained, model_name, head_layers=2, head_embed_dim=24, head_attention_heads=2)
    enc = model.w2v_encoder
    wav, pad = padded_batch([8000, 6000])
    with torch.no_grad():
        layers, mask = enc.layer_outputs(wav, pad)
        out = model(source=wav, padding_mask=pad)
    assert len(layers) == 1 + 2 + 2  # layer 0, two encoder layers, two head layers
    assert [t.shape[-1] for t in layers] == [32, 32, 32, 24, 24]
    assert all(t.shape[:2] == mask.shape for t in layers)
    assert torch.allclose(enc.proj(layers[-1]).transpose(0, 1), out["encoder_out"], atol=1e-6)
    with torch.no_grad():  # the encoder part is extract_features' (last layer, before any final norm)
        feats, _ = enc.w2v_model.extract_features(wav, padding_mask=pad, output_layer=2)
    assert torch.allclose(layers[2], feats, atol=1e-6)


@pytest.mark.parametrize("fields,message", [
    (dict(head_layers=-1), "model.head_layers=-1"),
    (dict(head_layers=1, head_conv_kernel=4), "head_conv_kernel=4 must be odd"),
    (dict(head_layers=1, head_type="transformer", head_attention_heads=5), "head_attention_heads=5"),
    (dict(feature_layer=7), "model.feature_layer=7, but the encoder has 2 layers"),
])
def test_bad_head_sizes_name_the_field(pretrained, fields, message):
    with pytest.raises(ValueError, match=message):
        build(pretrained, **fields)
