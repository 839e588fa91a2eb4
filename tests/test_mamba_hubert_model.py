"""MambaHubertModel against fairseq's HuBERT contract: extract_features, padding, init, config checks."""
import torch
import torch.nn.functional as F
import pytest
from omegaconf import OmegaConf
from fairseq.data import Dictionary
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel
from fairseq_mamba.modules import SelectiveSSM

from conftest import REPO

SMALL = dict(
    label_rate=50, encoder_layers=3, encoder_embed_dim=48, encoder_ffn_embed_dim=96,
    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", conv_pos=16, conv_pos_groups=4,
    extractor_mode="layer_norm", final_dim=16,
)


def build(cls=MambaHubertModel, cfg_cls=MambaHubertConfig, **overrides):
    dictionary = Dictionary()
    for i in range(10):
        dictionary.add_symbol(str(i))
    cfg = cfg_cls(**{**SMALL, **overrides})
    return cls(cfg, HubertPretrainingConfig(label_rate=50), [dictionary])


@pytest.mark.parametrize("bimamba_type", ["external", "internal", "none"])
def test_extract_features_at_every_output_layer(bimamba_type):
    model = build(bimamba_type=bimamba_type).eval()
    wav = torch.randn(2, 8000)
    with torch.no_grad():
        full, _ = model.extract_features(wav)
        encoder_input = model.post_extract_proj(model.layer_norm(model.feature_extractor(wav).transpose(1, 2)))
        _, layer_results = model.encoder(encoder_input)
        for k in range(1, 4):
            feats, pad = model.extract_features(wav, output_layer=k)
            assert feats.shape == (2, 24, 48) and pad is None
            assert torch.allclose(feats, layer_results[k - 1][0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(full, feats)  # the last layer is the full output (post-norm encoder)


@pytest.mark.parametrize("bimamba_type", ["external", "internal", "none"])
def test_padded_waveform_batch_equals_each_utterance_alone(bimamba_type):
    """End to end from samples: exact frame-level padding mask + padding-aware Mamba.

    (With extractor_mode=default, HuBERT Base's GroupNorm normalises over padded samples too,
    so no model with that extractor is batch-consistent; the configs say so.)"""
    model = build(bimamba_type=bimamba_type).eval()
    assert_padded_batch_equals_solo(model, [torch.randn(1, n) for n in (8000, 5123, 3300)])


def assert_padded_batch_equals_solo(model, solos, pad_value=1e3):
    """Right-pad the (1, n) waveforms ``solos`` with ``pad_value`` into one batch: every valid
    frame of every row equals the solo run within 1e-5, and the mask counts exactly its frames."""
    lengths = [solo.shape[1] for solo in solos]
    wav = torch.full((len(solos), max(lengths)), pad_value)
    mask = torch.ones(len(solos), max(lengths), dtype=torch.bool)
    for b, solo in enumerate(solos):
        wav[b, : lengths[b]], mask[b, : lengths[b]] = solo[0], False
    with torch.no_grad():
        batch, pad = model.extract_features(wav, padding_mask=mask)
        for b, solo in enumerate(solos):
            alone, _ = model.extract_features(solo)
            n = alone.shape[1]
            assert int((~pad[b]).sum()) == n
            assert (batch[b, :n] - alone[0]).abs().max().item() < 1e-5


def test_ssm_initialisation_survives_fairseq_init_bert_params():
    model = build(mamba_d_state=4)
    ssms = [m for m in model.modules() if isinstance(m, SelectiveSSM)]
    assert len(ssms) == 3 * 2  # external: two directions per layer
    for ssm in ssms:
        dt = F.softplus(ssm.dt_proj.bias)
        assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6  # not softplus(0) = 0.69
        assert torch.equal(ssm.A_log[0], torch.log(torch.arange(1.0, 5.0)))
        assert torch.equal(ssm.D, torch.ones_like(ssm.D))


def test_layerdrop_and_required_seq_len_multiple_come_from_fairseq_encoder():
    model = build(encoder_layerdrop=0.5, required_seq_len_multiple=8).train()
    x = torch.randn(2, 21, 48)
    counts = {len(model.encoder(x)[1]) for _ in range(40)}
    assert len(counts) > 1 and max(counts) <= 3  # some layers skipped at random
    out, results = model.eval().encoder(x)
    assert out.shape == (2, 21, 48) and all(r[0].shape[0] == 21 for r in results)


def test_remove_pretraining_modules_keeps_the_encoder():
    model = build()
    model.remove_pretraining_modules()
    assert model.final_proj is None
    feats, _ = model.extract_features(torch.randn(1, 4000))
    assert feats.shape[-1] == 48


def model_from_yaml(name, model_cls, cfg_cls):
    """Build the model section of examples/pretrain/<name>.yaml (label_rate 50, 500 units)."""
    section = OmegaConf.load(REPO / "examples" / "pretrain" / f"{name}.yaml").model
    del section["_name"]
    section.label_rate = 50
    cfg = OmegaConf.merge(OmegaConf.structured(cfg_cls), section)
    dictionary = Dictionary()
    for i in range(500):
        dictionary.add_symbol(str(i))
    return model_cls(cfg, HubertPretrainingConfig(label_rate=50), [dictionary])


def twin_models(size):
    """The mamba_hubert and hubert models of examples/pretrain/{model}_{size}.yaml and their
    parameter counts."""
    ours = model_from_yaml(f"mamba_hubert_{size}", MambaHubertModel, MambaHubertConfig)
    stock = model_from_yaml(f"hubert_{size}", HubertModel, HubertConfig)
    n_ours, n_stock = (sum(p.numel() for p in m.parameters()) for m in (ours, stock))
    print(f"parameters: mamba_hubert_{size} {n_ours:,}, hubert_{size} {n_stock:,}")
    return ours, stock, n_ours, n_stock


def test_base_config_is_within_ten_percent_of_hubert_base():
    ours, stock, n_ours, n_stock = twin_models("base_librispeech")
    assert len(ours.encoder.layers) == len(stock.encoder.layers) == 12
    assert 90e6 < n_stock < 100e6
    assert abs(n_ours / n_stock - 1) < 0.10 and abs(n_ours / 95e6 - 1) < 0.10


def test_tiny_cpu_configs_are_twins_within_ten_percent():
    """The demo's models: same depth, width and front-end, parameter counts within 10%."""
    ours, stock, n_ours, n_stock = twin_models("tiny_cpu")
    assert len(ours.encoder.layers) == len(stock.encoder.layers)
    yaml = lambda name: OmegaConf.load(REPO / "examples" / "pretrain" / f"{name}.yaml")
    a, b = yaml("mamba_hubert_tiny_cpu"), yaml("hubert_tiny_cpu")
    for key in ("encoder_embed_dim", "conv_feature_layers", "extractor_mode", "final_dim", "mask_prob"):
        assert a.model[key] == b.model[key], key
    for section in ("task", "dataset", "optimization", "optimizer", "lr_scheduler"):  # same schedule
        assert a[section] == b[section], section
    assert {**a.criterion, "_name": None} == {**b.criterion, "_name": None}  # same loss weights
    assert abs(n_ours / n_stock - 1) < 0.10


@pytest.mark.parametrize("field,value,match", [
    ("mamba_d_state", 0, "mamba_d_state=0"),
    ("mamba_dt_rank", "big", "mamba_dt_rank='big'"),
    ("bimamba_type", "sideways", "bimamba_type='sideways'"),
    ("mamba_expand", 0, "mamba_expand=0"),
])
def test_bad_sizes_fail_at_build_time_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        build(**{field: value})
