"""The letter n-gram LM (fairseq_mamba.decoding.ngram_lm) and the LM beam search (fairseq_mamba.decoding.lm_decoder)."""
import math

import pytest
import torch

from fairseq_mamba.decoding.decode import ctc_best_path, decode, letters_to_words
from fairseq_mamba.decoding.lm_decoder import LetterLMDecoder, grid
from fairseq_mamba.decoding.ngram_lm import BOS, EOS, UNK, estimate, main, read_sentences, write_arpa

SENTENCES = [s.split() for s in ("THE CAT SAT", "THE CAT RAN", "A DOG SAT ON THE CAT", "THE DOG", "A CAT")]


def read_arpa(path):
    """{ngram tuple: (log10 p, log10 bow)} from an ARPA file, parsed independently of ngram_lm."""
    model, n = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith("\\") and line.endswith("-grams:"):
            n = int(line[1:].split("-")[0])
        elif n and line and not line.startswith("\\"):
            parts = line.split("\t")
            model[tuple(parts[1].split())] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    return model


def arpa_prob(model, history, word):
    """p(word | history) by ARPA back-off: the longest stored n-gram, times the skipped back-offs."""
    for start in range(len(history) + 1):
        gram = tuple(history[start:]) + (word,)
        if gram in model:
            return 10 ** (model[gram][0] + sum(model.get(tuple(history[i:]), (0, 0))[1] for i in range(start)))
    raise AssertionError(f"{word} missing from the unigrams")


@pytest.fixture
def arpa(tmp_path):
    path = tmp_path / "lm.arpa"
    write_arpa(estimate(SENTENCES, order=3, discount=0.6), path)
    return path


def test_every_conditional_distribution_sums_to_one(arpa):
    model = read_arpa(arpa)
    vocab = [g[0] for g in model if len(g) == 1 and g[0] != BOS]
    histories = {g[:-1] for g in model if len(g) > 1} | {(), ("CAT", "THE"), ("ZEBRA",)}  # seen and unseen
    for h in histories:
        assert sum(arpa_prob(model, list(h), w) for w in vocab) == pytest.approx(1.0, abs=1e-4), h


def test_probabilities_match_the_formula_by_hand(tmp_path):
    # sentences "A B", "A C"; order 2, D = 0.5. Unigram counts A 2, B 1, C 1, </s> 2 (6 tokens, 4 types)
    # over |V| = 5 (with <unk>): uniform share 0.5 * 4 / 6 / 5 = 1/15; p(B) = 0.5/6 + 1/15 = 0.15.
    # Context A: 2 tokens, 2 types, so p(B | A) = (1 - 0.5)/2 + 0.5 * 2/2 * 0.15 = 0.325, bow(A) = 0.5.
    model = estimate([["A", "B"], ["A", "C"]], order=2, discount=0.5)
    assert 10 ** model[1][("B",)][0] == pytest.approx(0.15)
    assert 10 ** model[1][(UNK,)][0] == pytest.approx(1 / 15)
    assert 10 ** model[2][("A", "B")][0] == pytest.approx(0.325)
    assert 10 ** model[1][("A",)][1] == pytest.approx(0.5)
    assert 10 ** model[2][(BOS, "A")][0] == pytest.approx((2 - 0.5) / 2 + 0.5 * 1 / 2 * (1.5 / 6 + 1 / 15))
    assert model[2][("A", "B")][1] is None  # the highest order has no back-off weight
    assert (EOS,) in model[1] and model[1][(BOS,)][0] == -99.0  # <s> is never predicted: ARPA's log10(0)


def test_kenlm_reads_our_arpa_with_the_same_probabilities(arpa):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    words = [BOS, EOS, UNK, "THE", "CAT", "SAT", "DOG", "ZEBRA"]
    d = Dictionary()
    for w in words:
        d.add_entry(w)
    lm, model = KenLM(str(arpa), d), read_arpa(arpa)
    state, history, total = lm.start(False), [BOS], 0.0
    for w in ["THE", "DOG", "SAT", "ZEBRA", "CAT"]:
        state, score = lm.score(state, words.index(w))
        expected = math.log10(arpa_prob(model, history[-2:], w if w != "ZEBRA" else UNK))
        assert score == pytest.approx(expected, abs=1e-4), w
        history.append(w if w != "ZEBRA" else UNK)
        total += score
    assert total < -2


def test_lm_input_errors_name_the_file_line_and_value(tmp_path):
    bad = tmp_path / "train.wrd"
    bad.write_text("THE CAT\n\nA DOG\n")
    with pytest.raises(ValueError, match=r"train.wrd, line 2: empty transcript"):
        read_sentences(bad)
    with pytest.raises(ValueError, match="order must be >= 1, got 0"):
        estimate(SENTENCES, order=0)
    with pytest.raises(ValueError, match=r"discount must be in \(0, 1\), got 1.0"):
        estimate(SENTENCES, discount=1.0)
    with pytest.raises(ValueError, match="LM weight must be a finite number >= 0, got -1"):
        grid([-1.0], [0.0])
    with pytest.raises(ValueError, match="--tune-split test is the split decoded"):
        decode("ft.pt", str(tmp_path), "test", str(tmp_path / "out"), lm="lm.arpa", tune_split="test")


def test_cli_writes_a_letter_lm(tmp_path, capsys):
    ltr = tmp_path / "train.ltr"
    ltr.write_text("T H E | C A T |\nT H E | D O G |\n")
    main([str(ltr), str(tmp_path / "l.arpa"), "--order", "4"])
    model = read_arpa(tmp_path / "l.arpa")
    assert ("T", "H", "E", "|") in model and max(len(g) for g in model) == 4
    assert "4-grams" in capsys.readouterr().out


SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "|", "T", "H", "E", "A"]


def posteriors(frames):
    """(T, V) log-posteriors from per-frame {symbol: probability}; the rest of the mass on blank."""
    p = torch.full((len(frames), len(SYMBOLS)), 1e-4)
    for t, probs in enumerate(frames):
        for s, v in probs.items():
            p[t, SYMBOLS.index(s)] = v
        p[t, 0] += 1 - p[t].sum()
    return p.log()


def words(path):
    return letters_to_words([SYMBOLS[t] for t in ctc_best_path(path, blank=0, drop=(1, 2))])


@pytest.fixture
def letter_lm(tmp_path):
    path = tmp_path / "letters.arpa"
    write_arpa(estimate([list("THE|")] * 20 + [list("HAT|")], order=4, discount=0.5), path)
    return path


def test_lm_corrects_a_spelling_that_viterbi_gets_wrong(letter_lm):
    # T, H, then a frame split A 0.55 / E 0.44: the argmax spells THA, the LM knows THE
    lp = posteriors([{"T": 0.9}, {}, {"H": 0.9}, {}, {"A": 0.55, "E": 0.44}, {}, {"|": 0.9}])
    assert words(lp.argmax(-1).tolist()) == "THA"
    dec = LetterLMDecoder(letter_lm, SYMBOLS, beam=20)
    assert words(dec(lp, lm_weight=0.0)) == "THA"  # no LM: the beam finds the Viterbi answer
    assert words(dec(lp, lm_weight=1.0)) == "THE"
    path = dec(lp, lm_weight=1.0)
    assert len(path) == lp.shape[0]  # one token per frame
    # the letters tried per frame, most likely first: E is the second at its frame
    assert words(LetterLMDecoder(letter_lm, SYMBOLS, beam=20, beam_size_token=1)(lp, lm_weight=1.0)) == "THA"
    assert words(LetterLMDecoder(letter_lm, SYMBOLS, beam=20, beam_size_token=2)(lp, lm_weight=1.0)) == "THE"


def test_lm_decoder_shapes_and_settings(letter_lm):
    dec = LetterLMDecoder(letter_lm, SYMBOLS)
    assert dec(torch.zeros(0, len(SYMBOLS)), 1.0) == []
    with pytest.raises(ValueError, match=r"expected \(T, 9\) log-posteriors, got \(5, 4\)"):
        dec(torch.zeros(5, 4), 1.0)
    with pytest.raises(ValueError, match="beam must be >= 1, got 0"):
        LetterLMDecoder(letter_lm, SYMBOLS, beam=0)
    with pytest.raises(ValueError, match="beam_size_token must be >= 1"):
        LetterLMDecoder(letter_lm, SYMBOLS, beam_size_token=0)
    assert LetterLMDecoder(letter_lm, SYMBOLS, beam_size_token=None).beam_size_token == len(SYMBOLS)
    assert LetterLMDecoder(letter_lm, SYMBOLS, beam_size_token=50).beam_size_token == len(SYMBOLS)
    with pytest.raises(ValueError, match="word boundary '#' is not in the dictionary"):
        LetterLMDecoder(letter_lm, SYMBOLS, sil="#")
    assert grid([1.0, 2.0], [-1.0, 0.0]) == [(1.0, -1.0), (1.0, 0.0), (2.0, -1.0), (2.0, 0.0)]
