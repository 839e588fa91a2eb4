"""Long-form encoding: chunked, bounded-memory per-layer features equal the one-pass result."""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.models.hubert.hubert import HubertConfig, HubertModel

from fairseq_mamba.inference import encode_long
from fairseq_mamba.inference.long_form import conv_geometry, group_norm_affine, iter_layer_features, num_frames
from fairseq_mamba.modules import BIMAMBA_TYPES, MambaEncoderLayer, build_mixer_cls
from test_mamba_hubert_model import SMALL, build

from conftest import REPO, subprocess_env

TOL = 1e-5
SAMPLES = 16000 * 2 + 123 + 320  # 101 frames: odd, so the one pass pads to required_seq_len_multiple


def make_model(kind, **overrides):
    if kind == "hubert":
        return build(HubertModel, HubertConfig, encoder_attention_heads=4, **overrides).eval()
    return build(bimamba_type=kind, **overrides).eval()


def one_pass(model, wav, layers):
    with torch.no_grad():
        return {k: model.extract_features(wav[None], output_layer=k)[0][0] for k in layers}


@pytest.mark.parametrize("bimamba_type", BIMAMBA_TYPES)
@pytest.mark.parametrize("layer_norm_first,merge", [(False, "concat"), (True, "sum")])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_layer_forward_long_equals_forward(bimamba_type, layer_norm_first, merge, chunk):
    layer = MambaEncoderLayer(32, build_mixer_cls(bimamba_type, merge=merge, d_state=8), ffn_dim=64,
                              layer_norm_first=layer_norm_first).eval()
    x = torch.randn(203, 1, 32)
    with torch.no_grad():
        full, _ = layer(x)
        long = layer.forward_long(x, chunk)
    assert (long - full).abs().max().item() < TOL


@pytest.mark.parametrize("kind", [*BIMAMBA_TYPES, "hubert"])
@pytest.mark.parametrize("extractor_mode", ["layer_norm", "default"])
@pytest.mark.parametrize("chunk_frames", [7, 1000])
def test_every_layer_equals_one_pass(kind, extractor_mode, chunk_frames):
    model = make_model(kind, extractor_mode=extractor_mode, layer_norm_first=chunk_frames == 7)
    wav = torch.randn(SAMPLES)
    reference = one_pass(model, wav, [1, 2, 3])
    got = dict(iter_layer_features(model, wav, [3, 1, 2], chunk_frames))
    assert list(got) == [1, 2, 3]
    for k, ref in reference.items():
        assert got[k].shape == ref.shape == (101, 48)
        assert (got[k] - ref).abs().max().item() < TOL, k


@pytest.mark.parametrize("groups", [32, 4])
def test_group_norm_statistics_summed_in_chunks_equal_the_whole_axis(groups):
    conv = torch.nn.Conv1d(1, 32, 10, stride=5, bias=False)
    norm = torch.nn.GroupNorm(groups, 32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    wav = 3 + torch.randn(20011)  # an offset, so a naive fp32 variance would lose digits
    scale, shift = group_norm_affine(torch.nn.Sequential(conv, norm), wav, chunk_samples=999)
    with torch.no_grad():
        y = conv(wav[None, None])
        assert (y * scale + shift - norm(y)).abs().max().item() < TOL


def test_frame_count_arithmetic_matches_the_conv_stack():
    extractor = make_model("none").feature_extractor
    receptive, hop = conv_geometry(extractor)
    assert (receptive, hop) == (400, 320)
    for n in [400, 719, 720, 721, 5000, 16123]:
        with torch.no_grad():
            assert extractor(torch.zeros(1, n)).shape[-1] == num_frames(n, receptive, hop)
    assert num_frames(399, receptive, hop) == 0  # the conv stack itself raises on it


def test_bad_requests_name_the_fix():
    model = make_model("none")
    with pytest.raises(ValueError, match=r"1\.\.3"):
        next(iter_layer_features(model, torch.randn(4000), [4]))
    with pytest.raises(ValueError, match="needs 400"):
        next(iter_layer_features(model, torch.randn(399), [1]))


def write_checkpoint(model, path, bimamba_type):
    """A fairseq checkpoint as the trainer writes it (cfg, model, task_state, histories)."""
    units = Dictionary()
    for i in range(10):
        units.add_symbol(str(i))
    torch.save({
        "cfg": {"task": {"_name": "hubert_pretraining", "data": str(path.parent), "labels": ["km"],
                         "label_dir": str(path.parent), "label_rate": 50, "normalize": True},
                "model": {"_name": "mamba_hubert", "bimamba_type": bimamba_type, **SMALL}},
        "model": model.state_dict(), "task_state": {"dictionaries": [units]},
        "optimizer_history": [{"num_updates": 0, "optimizer_name": "Adam", "lr_scheduler_state": {}}],
        "extra_state": {"train_iterator": None},
    }, path)


def test_cli_on_a_checkpoint_equals_one_pass_of_the_normalised_waveform(tmp_path):
    model = make_model("external")
    write_checkpoint(model, tmp_path / "ckpt.pt", "external")
    wav = 0.3 * torch.randn(SAMPLES) + 0.1
    sf.write(tmp_path / "a.wav", wav.numpy(), 16000, subtype="FLOAT")
    encode_long.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "a.wav"), str(tmp_path / "out"),
                      "--layers", "1", "3", "--chunk-frames", "16", "--no-progress"])
    reference = one_pass(model, F.layer_norm(wav, wav.shape), [1, 3])  # the task says normalize
    for k in (1, 3):
        got = np.load(tmp_path / "out" / f"layer{k}.npy")
        assert np.abs(got - reference[k].numpy()).max() < TOL
    assert not (tmp_path / "out" / "layer2.npy").exists()
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["frames"] == 101 and info["frame_rate_hz"] == 50 and info["normalize"] is True


def test_cli_module_on_a_config_shows_progress_and_writes_every_layer(tmp_path):
    wav = 0.3 * np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32)
    sf.write(tmp_path / "a.flac", wav, 16000)
    config = REPO / "examples/pretrain/mamba_hubert_tiny_cpu.yaml"
    proc = subprocess.run([sys.executable, "-m", "fairseq_mamba.inference.encode_long", str(config),
                           str(tmp_path / "a.flac"), str(tmp_path / "out"), "--threads", "1"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layer 4/4" in proc.stderr and "100%" in proc.stderr  # the tqdm bar
    model, normalize = encode_long.load_model(str(config), seed=0)
    assert normalize
    x = torch.from_numpy(sf.read(tmp_path / "a.flac", dtype="float32")[0])
    reference = one_pass(model, F.layer_norm(x, x.shape), [1, 2, 3, 4])
    for k, ref in reference.items():
        assert np.abs(np.load(tmp_path / "out" / f"layer{k}.npy") - ref.numpy()).max() < TOL


def test_audio_that_is_not_16k_mono_is_refused(tmp_path):
    sf.write(tmp_path / "stereo.wav", np.zeros((1600, 2), np.float32), 16000)
    sf.write(tmp_path / "8k.wav", np.zeros(1600, np.float32), 8000)
    for name in ("stereo.wav", "8k.wav"):
        with pytest.raises(ValueError, match="16000 Hz mono"):
            encode_long.read_audio(str(tmp_path / name))
