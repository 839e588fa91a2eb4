"""Layer extraction for the MI analysis: valid frames only, padded batch == solo, 100 Hz alignment, bad streams."""
import numpy as np
import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

from fairseq_mamba.analysis import layer_features as lf
from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel

from conftest import write_tiny_dataset

CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"  # HuBERT's stack: 400-sample windows, stride 320


def tiny(cls, cfg_cls, layers=2, conv=CONV, dim=48):
    dictionary = Dictionary()
    dictionary.add_symbol("0")
    cfg = cfg_cls(label_rate=50, encoder_layers=layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=64,
                  encoder_attention_heads=2, conv_feature_layers=conv, conv_pos=16, conv_pos_groups=4,
                  extractor_mode="layer_norm", final_dim=16)
    return cls(cfg, HubertPretrainingConfig(label_rate=50), [dictionary]).eval()


MODELS = {"mamba_hubert": (MambaHubertModel, MambaHubertConfig), "hubert": (HubertModel, HubertConfig)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return tiny(*MODELS[request.param])


def test_geometry_counts_the_conv_stack_output_exactly(model):
    geometry = lf.FrameGeometry.of(model)
    assert (geometry.stride, geometry.receptive, geometry.rate) == (320, 400, 50.0)
    for n in (400, 719, 720, 16000, 16199, 16200, 16519):
        with torch.no_grad():
            frames = model.feature_extractor(torch.randn(1, n)).shape[-1]
        assert geometry.n_frames(n) == frames == (n - 400) // 320 + 1


def test_stream_index_is_the_nearest_centre():
    hubert = lf.FrameGeometry(((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)))
    j = np.arange(50)
    assert (hubert.stream_index(50, lf.MFCC_WIN) == 2 * j).all()  # the very same 25 ms window
    assert (hubert.stream_index(50, lf.PHONE_WIN) == 2 * j + 1).all()  # the 10 ms frame holding the centre
    odd = lf.FrameGeometry(((7, 3), (5, 3)))  # stride 9, receptive 19: centres fall between 100 Hz frames
    for win in (160, 400):
        centres = odd.stride * j + odd.receptive / 2
        stream_centres = lf.HOP * np.arange(200) + win / 2
        nearest = np.abs(centres[:, None] - stream_centres[None, :]).argmin(1)
        assert (odd.stream_index(50, win) == nearest).all()


def test_layers_are_the_encoder_input_and_every_layer_output(model):
    wav = torch.randn(9000)
    layers = lf.extract_layers(model, [wav])
    assert len(layers) == 3 and all(h.shape == (lf.FrameGeometry.of(model).n_frames(9000), 48) for h in layers)
    with torch.no_grad():
        x = model.layer_norm(model.feature_extractor(wav[None]).transpose(1, 2))
        x = x if model.post_extract_proj is None else model.post_extract_proj(x)
        x = model.encoder.layer_norm(x + model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        assert torch.allclose(layers[0], x[0], atol=1e-5)
        for k in (1, 2):
            assert torch.allclose(layers[k], model.extract_features(wav[None], output_layer=k)[0][0], atol=1e-5)


def test_padded_batch_gives_every_utterance_its_solo_frames(model):
    # 320 n + 200 samples: fairseq's HubertModel would call frame n valid (it has valid samples)
    # although the conv stack gives n frames; the exact mask keeps it out of attention.
    lengths = [320 * 40 + 200, 320 * 25 + 200, 8017, 3300]
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(n, generator=g) for n in lengths]
    solo = lf.extract_layers(model, waves, batch_seconds=0)
    batched = lf.extract_layers(model, waves, batch_seconds=10)
    assert [h.shape[0] for h in solo] == [sum(lf.FrameGeometry.of(model).n_frames(n) for n in lengths)] * 3
    for a, b in zip(solo, batched):
        assert (a - b).abs().max() < 1e-5


def test_the_exact_mask_matters_for_stock_hubert():
    """Without it, stock HuBERT's padded batch differs from solo (so the test above can fail)."""
    torch.manual_seed(0)
    model = tiny(HubertModel, HubertConfig)
    waves = [torch.randn(320 * 40 + 200), torch.randn(320 * 20 + 200)]
    geometry = lf.FrameGeometry.of(model)
    source = torch.zeros(2, len(waves[0]))
    pad = torch.ones(2, len(waves[0]), dtype=torch.bool)
    for b, w in enumerate(waves):
        source[b, :len(w)], pad[b, :len(w)] = w, False
    with torch.no_grad():
        plain = model.extract_features(source, padding_mask=pad)[0][1, :geometry.n_frames(len(waves[1]))]
    solo = lf.extract_layers(model, waves[1:])[-1]
    assert (plain - solo).abs().max() > 1e-3


def test_keep_selects_frames_and_progress_is_reported(model):
    waves = [torch.randn(6000), torch.randn(4000)]
    keep = [np.array([0, 3, 5]), np.array([1])]
    seen = []
    full = lf.extract_layers(model, waves)
    some = lf.extract_layers(model, waves, keep=keep, batch_seconds=1, progress=seen.append)
    n0 = lf.FrameGeometry.of(model).n_frames(6000)
    assert torch.allclose(some[1], full[1][[0, 3, 5, n0 + 1]], atol=1e-5)  # batched vs solo: fp32 rounding
    assert seen == [2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six 0.75-1.5 s utterances with 100 Hz labels (one per 160 samples), as the bundled corpus's .phn."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("layer_features"))
    return root, lf.read_manifest(str(root / "train.tsv"))


def test_labels_and_mfcc_align_to_model_frames(corpus):
    root, utts = corpus
    geometry = lf.FrameGeometry(((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)))
    raw = [line.split() for line in open(root / "train.km")]
    labels = lf.read_labels(str(root / "train.km"), utts, geometry, lf.PHONE_WIN)
    mfcc = lf.read_mfcc(utts, geometry)
    reader = lf.mfcc_reader()
    for u, r, lab, m in zip(utts, raw, labels, mfcc):
        n = geometry.n_frames(u.n_samples)
        assert len(lab) == len(m) == n
        full = reader.get_feats(u.path).numpy()
        assert len(full) == 1 + (u.n_samples - 400) // 160
        assert np.array_equal(m, full[2 * np.arange(n)])
        ids = {s: i for i, s in enumerate(dict.fromkeys(t for line in raw for t in line))}
        assert [ids[r[2 * j + 1]] for j in range(n)] == lab.tolist()
    # the same labels at the model's own 50 Hz rate are used frame for frame
    rate50 = root / "rate50.km"
    rate50.write_text("".join(" ".join(r[1::2][:geometry.n_frames(u.n_samples)]) + "\n" for u, r in zip(utts, raw)))
    assert all(np.array_equal(a, b) for a, b in zip(lf.read_labels(str(rate50), utts, geometry, lf.PHONE_WIN), labels))


def test_kmeans_units_match_upstream_apply_kmeans(corpus, tmp_path):
    import joblib
    from sklearn.cluster import KMeans

    root, utts = corpus
    geometry = lf.FrameGeometry(((400, 320),))
    mfcc = lf.read_mfcc(utts, geometry)
    km = KMeans(5, n_init=1, random_state=0).fit(np.concatenate(mfcc).astype(np.float64))
    joblib.dump(km, tmp_path / "km.bin")
    units = lf.kmeans_units(str(tmp_path / "km.bin"), mfcc)
    agree = np.concatenate([u == km.predict(m.astype(np.float64)) for u, m in zip(units, mfcc)])
    assert agree.mean() > 0.99  # float32 (upstream) vs float64 distances may split a near-tie
    joblib.dump(KMeans(3, n_init=1).fit(np.random.rand(20, 768)), tmp_path / "hubert_km.bin")
    with pytest.raises(ValueError, match=r"hubert_km.bin clusters 768-d features, not 39-d MFCC.*--units"):
        lf.kmeans_units(str(tmp_path / "hubert_km.bin"), mfcc)


def test_bad_streams_name_the_file_line_and_fix(corpus, tmp_path):
    root, utts = corpus
    geometry = lf.FrameGeometry(((400, 320),))
    lines = open(root / "train.km").read().splitlines()
    short = tmp_path / "short.km"
    short.write_text("\n".join(lines[:2] + [" ".join(lines[2].split()[:-5])] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"{short} line 3 \(train2.wav, manifest line 4\): .*regenerate"):
        lf.read_labels(str(short), utts, geometry, lf.PHONE_WIN)
    with pytest.raises(ValueError, match=r"has 4 lines for 6 manifest rows"):
        few = tmp_path / "few.km"
        few.write_text("\n".join(lines[:4]) + "\n")
        lf.read_labels(str(few), utts, geometry, lf.PHONE_WIN)
    with pytest.raises(ValueError, match=r"MFCC of .*train0.wav \(manifest line 2\): .*frames"):
        lf.align(np.zeros((10, 39)), geometry, utts[0].n_samples, lf.MFCC_WIN, f"MFCC of {utts[0].path} (manifest line 2)")


def test_bad_manifest_and_audio_are_refused_up_front(corpus, tmp_path):
    """read_manifest runs fairseq_mamba.checks.data_checks on every file before any model work."""
    root, utts = corpus
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{root}\nwav/train0.wav\t{utts[0].n_samples}\nwav/train1.wav\n")
    with pytest.raises(ValueError, match=rf"{bad} line 3: 'wav/train1.wav' is not"):
        lf.read_manifest(str(bad))
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text(f"{root}\nwav/train0.wav\t{utts[0].n_samples}\nwav/train1.wav\t{utts[1].n_samples + 7}\n")
    with pytest.raises(ValueError, match=rf"(?s){wrong} line 3: .*train1.wav has {utts[1].n_samples} samples but the "
                                         rf"manifest says {utts[1].n_samples + 7}.*Fix: rebuild the manifest"):
        lf.read_manifest(str(wrong))
