"""The reconstruction model (issue #14): noisy_speech mixing, speech_enhancement task, hubert_enhancer
model, spectral_reconstruction criterion, and the evaluation command."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import fairseq_mamba  # noqa: F401  (registers the task, model and criterion)
from fairseq import tasks
from fairseq_mamba.inference import evaluate_enhancement
from fairseq_mamba.tasks import noisy_speech
from fairseq_mamba.models import hubert_enhancer
from fairseq_mamba.analysis import layer_features as lf
from fairseq_mamba.criterions.spectral_reconstruction import SpectralReconstructionCriterion, log_spectral_distance

from conftest import write_tiny_dataset

TINY = dict(_name="hubert_enhancer", extractor_mode="layer_norm", encoder_layers=2, encoder_embed_dim=32,
            encoder_ffn_embed_dim=64, encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4, mamba_expand=1,
            conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", dropout=0.0,
            dropout_input=0.0, dropout_features=0.0)
HUBERT_STACK = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"  # receptive field 400, stride 320: HuBERT's


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("enhance"), n_train=6, n_valid=6)


def build(data, encoder_type="mamba_hubert", **task_kw):
    cfg = OmegaConf.create({"task": {"_name": "speech_enhancement", "data": str(data), **task_kw},
                            "model": dict(TINY, encoder_type=encoder_type)})
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return cfg, task, task.build_model(cfg.model)


def test_mixture_has_the_stated_snr_and_is_reproducible(data):
    _, task, _ = build(data, normalize=False)
    task.load_dataset("train")
    ds = task.dataset("train")
    seen = set()
    for i in range(len(ds)):
        noisy, clean, snr, kind = ds.noisy_pair(i)
        noise = noisy - clean
        assert 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2)) == pytest.approx(snr, abs=1e-6)
        assert snr in (0.0, 5.0, 10.0) and kind in noisy_speech.NOISE_TYPES
        np.testing.assert_array_equal(ds.noisy_pair(i)[0], noisy)  # same (seed, epoch, utterance): same noise
        seen.add(kind)
    first = ds.noisy_pair(0)[0]
    ds.set_epoch(2)  # training draws new noise each epoch ...
    assert not np.allclose(ds.noisy_pair(0)[0], first)
    task.load_dataset("valid")
    valid = task.dataset("valid")
    fixed = valid.noisy_pair(0)[0]
    valid.set_epoch(5)  # ... valid and test are one fixed noisy set
    np.testing.assert_array_equal(valid.noisy_pair(0)[0], fixed)
    assert len(seen) >= 2


def test_pink_noise_has_a_one_over_f_spectrum():
    x = noisy_speech.pink(2 ** 16, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(x)) ** 2
    low, high = power[100:200].mean(), power[1000:2000].mean()  # 10x the frequency: 1/10 the power
    assert low / high == pytest.approx(10, rel=0.25)


def test_bad_noise_settings_are_named(data):
    _, task, _ = build(data, noise_types=["white", "brown"])
    with pytest.raises(ValueError, match=r"task.noise_types=\['white', 'brown'\]"):
        task.load_dataset("train")


def test_batches_crop_noisy_and_clean_alike_without_padding(data):
    _, task, _ = build(data)
    task.load_dataset("train")
    ds = task.dataset("train")
    items = [ds[i] for i in range(3)]
    batch = ds.collater(items)
    size = min(len(s["source"]) for s in items)
    assert batch["net_input"]["source"].shape == batch["clean"].shape == (3, size)
    assert "padding_mask" not in batch["net_input"]
    for b, s in enumerate(items):  # the same crop of both signals
        start = int(ds.rng(s["id"], 1).integers(len(s["source"]) - size + 1))
        torch.testing.assert_close(batch["clean"][b], s["clean"][start:start + size])
        torch.testing.assert_close(batch["net_input"]["source"][b], s["source"][start:start + size])


def test_target_frames_are_the_model_frames_own_windows(data):
    _, _, model = build(data)
    wave = torch.randn(1, 9000, dtype=torch.float32)
    n = lf.FrameGeometry.of(model).n_frames(9000)
    out = model(wave)
    assert out["pred"].shape == (1, n, 201) and not out["padding_mask"].any()
    frames = model.target_frames(wave, n)[0]
    window = torch.hann_window(400)
    for j in (0, n // 2, n - 1):  # HuBERT's stack: frame j is exactly samples [320 j, 320 j + 400)
        expected = torch.log10(torch.fft.rfft(wave[0, 320 * j:320 * j + 400] * window).abs() ** 2 + hubert_enhancer.POWER_FLOOR)
        torch.testing.assert_close(frames[j], expected, rtol=1e-4, atol=1e-4)
    # padded frames are masked, counted as the conv stack produces them
    pad = torch.zeros(2, 9000, dtype=torch.bool)
    pad[1, 5000:] = True
    mask = model(wave.repeat(2, 1), padding_mask=pad)["padding_mask"]
    assert (~mask).sum(1).tolist() == [n, lf.FrameGeometry.of(model).n_frames(5000)]


@pytest.mark.parametrize("encoder_type", ["mamba_hubert", "hubert"])
def test_a_few_updates_lower_the_loss_and_the_metric_is_computed(data, encoder_type):
    _, task, model = build(data, encoder_type)
    task.load_dataset("train")
    ds = task.dataset("train")
    batch = ds.collater([ds[i] for i in range(4)])
    criterion = SpectralReconstructionCriterion(task)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(12):
        loss, frames, log = criterion(model, batch)
        losses.append(loss.item() / frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses
    assert log["sample_size"] == frames == 4 * lf.FrameGeometry.of(model).n_frames(batch["clean"].shape[1])
    assert log["lsd_noisy"] / frames > 1 and np.isfinite(log["lsd_enhanced"])


def test_evaluate_command_scores_a_saved_checkpoint(data, tmp_path):
    cfg, task, model = build(data, "hubert")
    ckpt = tmp_path / "enhancer.pt"
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "spectral_reconstruction", "optimizer_name": "adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, ckpt)
    result = evaluate_enhancement.main([str(ckpt), str(data), "--split", "valid", "--out", str(tmp_path / "v.json")])
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(json.dumps(result))
    assert result["utterances"] == 6 and result["encoder"] == "HubertModel"
    assert result["lsd_improvement_db"] == pytest.approx(result["lsd_noisy_db"] - result["lsd_enhanced_db"], abs=2e-3)
    assert sum(v["utterances"] for v in result["by_snr"].values()) == 6
    # the noisy input's distance, recomputed by hand over the 6 utterances
    task.load_dataset("valid")
    by_hand = []
    for item in (task.dataset("valid")[i] for i in range(6)):
        n = lf.FrameGeometry.of(model).n_frames(len(item["source"]))
        by_hand.append(float(log_spectral_distance(model.target_frames(item["source"][None], n),
                                                   model.target_frames(item["clean"][None], n)).mean()))
    assert result["lsd_noisy_db"] == pytest.approx(np.mean(by_hand), abs=1e-3) and result["lsd_noisy_db"] > 1
    assert 0 < result["lsd_mean_spectrum_db"] < result["lsd_noisy_db"]  # noise costs more than a constant guess


def test_the_stage_09_loader_reads_an_enhancer_checkpoint(data, tmp_path):
    cfg, _, model = build(data)
    ckpt = tmp_path / "enhancer.pt"
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "spectral_reconstruction", "optimizer_name": "adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, ckpt)
    loaded, name, normalize = lf.load_checkpoint(str(ckpt))
    assert name == "hubert_enhancer" and normalize and lf.head_layers(loaded) == 0
    wave = torch.randn(7000)
    layers = lf.extract_layers(loaded, [wave])
    direct = lf.extract_layers(model.eval().encoder_model, [wave])
    assert len(layers) == 3
    for a, b in zip(layers, direct):
        torch.testing.assert_close(a, b)
