"""Checks for the bundled synthetic corpus in examples/corpus/data."""
import ctypes
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples", "corpus")
DATA = os.path.join(ROOT, "data")
SPLITS = ("train", "valid", "test")
SR, HOP, SIL = 16000, 160, "sil"


def _lines(split, ext):
    with open(os.path.join(DATA, f"{split}.{ext}"), encoding="utf-8") as f:
        return f.read().splitlines()


def _tsv(split):
    return [line.split("\t") for line in _lines(split, "tsv")]


@pytest.fixture(scope="module", params=SPLITS)
def split(request):
    return request.param


def test_files_line_up(split):
    rows = _tsv(split)
    assert rows and all(len(r) == 7 for r in rows)
    n = len(rows)
    for ext in ("wrd", "phn", "spk", "txt"):
        assert len(_lines(split, ext)) == n, ext
    assert [r[3] for r in rows] == _lines(split, "spk")
    assert len({r[0] for r in rows}) == n
    for uid, rel, *_ in rows:
        assert rel == f"{split}/{uid}.flac"
    on_disk = sorted(os.listdir(os.path.join(DATA, split)))
    assert on_disk == sorted(os.path.basename(r[1]) for r in rows)


def test_audio_decodes_16k_mono_and_matches_tsv(split):
    for uid, rel, n, *_ in _tsv(split):
        info = sf.info(os.path.join(DATA, rel))
        assert (info.samplerate, info.channels, info.format, info.subtype) == \
            (SR, 1, "FLAC", "PCM_16"), uid
        assert info.frames == int(n), uid
        assert int(n) % HOP == 0, uid
    # decode a sample fully
    for uid, rel, n, *_ in _tsv(split)[:5]:
        audio, sr = sf.read(os.path.join(DATA, rel), dtype="int16")
        assert sr == SR and audio.ndim == 1 and len(audio) == int(n)
        assert np.abs(audio).max() > 1000, "not silent"
        assert np.abs(audio).max() < 32767, "clipped"


def test_label_lengths(split):
    """One phone label per 10 ms frame: len(labels) == num_samples / 160 exactly,
    well inside fairseq HubertDataset.verify_label_lengths' 0.1 s tolerance."""
    for (uid, _, n, *_), phn in zip(_tsv(split), _lines(split, "phn")):
        labels = phn.split()
        assert len(labels) == int(n) // HOP, uid
        assert abs(int(n) / SR - len(labels) / 100) <= 0.1


def test_durations():
    minutes = {s: sum(int(r[2]) for r in _tsv(s)) / SR / 60 for s in SPLITS}
    assert minutes["train"] >= 30.0
    assert minutes["valid"] >= 1.5 and minutes["test"] >= 2.5


def test_transcripts(split):
    for wrd, txt in zip(_lines(split, "wrd"), _lines(split, "txt")):
        words = wrd.split()
        assert 4 <= len(words) <= 20
        assert all(re.fullmatch(r"[A-Z]+('[A-Z]+)?", w) for w in words), wrd
        assert re.findall(r"[A-Za-z']+", txt.upper()) == words


def test_test_sentences_unseen_in_training():
    train = set(_lines("train", "wrd"))
    for s in ("valid", "test"):
        sents = _lines(s, "wrd")
        assert not train & set(sents), s
        assert len(set(sents)) == len(sents)
    assert not set(_lines("valid", "wrd")) & set(_lines("test", "wrd"))
    # part of the test set uses speakers / voice settings never seen in training
    train_spk = set(_lines("train", "spk"))
    unseen = [s for s in _lines("test", "spk") if s not in train_spk]
    assert len(unseen) >= len(_lines("test", "spk")) // 3


def test_vocabulary_size():
    vocab = {w for s in SPLITS for line in _lines(s, "wrd") for w in line.split()}
    assert len(vocab) >= 2000


def test_phone_labels(split):
    counts = Counter()
    for phn in _lines(split, "phn"):
        labels = phn.split()
        # 100 ms of padding at each end -> at least the first/last 10 frames silent
        assert labels[:10] == [SIL] * 10 and labels[-10:] == [SIL] * 10
        assert len(set(labels)) >= 5
        counts.update(labels)
    rows = [line.split("\t") for line in _lines_phones()[1:]]
    col = 1 + SPLITS.index(split)
    assert {r[0]: int(r[col]) for r in rows if int(r[col])} == dict(counts)
    if split == "train":
        with open(os.path.join(DATA, "dict.phn.txt"), encoding="utf-8") as f:
            dct = [line.split(" ") for line in f.read().splitlines()]
        assert {p for p, _ in dct} == {r[0] for r in rows}
        assert len(counts) >= 30
        assert counts[SIL] < 0.25 * sum(counts.values())


def _lines_phones():
    with open(os.path.join(DATA, "phones.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def _espeak_available():
    try:
        ctypes.CDLL("libespeak-ng.so.1")
        import scipy.signal  # noqa: F401
        return True
    except (OSError, ImportError):
        return False


@pytest.mark.skipif(not _espeak_available(),
                    reason="libespeak-ng.so.1 or scipy missing (apt-get install espeak-ng)")
def test_regenerate_matches_committed():
    sys.path.insert(0, ROOT)
    try:
        import make_corpus
    finally:
        sys.path.remove(ROOT)
    picks = [("train", 0), ("train", 7), ("valid", 3), ("test", 1)]  # test 1: held-out voice
    jobs, want = [], []
    for s, i in picks:
        uid, rel, n, voice, rate, pitch, prange = _tsv(s)[i]
        assert (voice, int(rate), int(pitch), int(prange)) == make_corpus.voice_for(s, i, 1)
        jobs.append((_lines(s, "txt")[i], voice, int(rate), int(pitch), int(prange)))
        audio, _ = sf.read(os.path.join(DATA, rel), dtype="int16")
        want.append((audio, _lines(s, "phn")[i].split()))
    for (audio, labels), (ref_audio, ref_labels) in zip(make_corpus.render_many(jobs), want):
        assert labels == ref_labels
        assert audio.shape == ref_audio.shape and np.array_equal(audio, ref_audio)
