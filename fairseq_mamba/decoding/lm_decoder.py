"""CTC beam search with a letter n-gram LM (flashlight's lexicon-free decoder), for ``decode.py``.

The fine-tuned model's CTC outputs are letters with ``|`` between words.  An n-gram LM over those
same tokens (``python -m fairseq_mamba.decoding.ngram_lm train.ltr LM.arpa --order 6``) scores every
hypothesis as the beam grows, so spellings follow the training text while any word can still be
spelled.  No lexicon on purpose: 24% of the bundled test split's word tokens never occur in train,
and a lexicon decoder can never output them.

Decoder and KenLM come from ``flashlight-text`` (``pip install flashlight-text``, the ``lm``
extra; its wheels include KenLM, which reads ARPA files directly, up to order 6).  It is
try-imported and set to ``None`` where absent: Viterbi decoding needs none of it.
"""
import math

try:
    from flashlight.lib.text.decoder import CriterionType, LexiconFreeDecoder, LexiconFreeDecoderOptions
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary
except ImportError:  # optional: only LM decoding needs it
    LexiconFreeDecoder = None


class LetterLMDecoder:
    """Beam search over CTC log-posteriors with a token-level KenLM, loaded once.

    ``symbols``: the target dictionary's symbols in index order (``tgt_dict.symbols``); the ARPA
    file's words are those same strings (letters, ``|``), any other symbol scores as ``<unk>``.
    A call scores each hypothesis as its CTC log-posteriors + ``lm_weight`` * LM log10-probability
    + ``sil_score`` per word boundary. ``beam_size_token``: the letters tried per frame, the most
    likely first (all of them: ``None``); 10 of the 32 gave the same test WER as all 32 on the
    demo's checkpoints at 2.2x the speed (hubert 71.84, mamba_hubert + Conformer 65.43).
    """

    def __init__(self, arpa, symbols, beam=100, beam_threshold=25.0, blank=0, sil="|", beam_size_token=10):
        if LexiconFreeDecoder is None:
            raise ImportError("LM decoding needs flashlight-text: pip install flashlight-text "
                              "(or pip install -e .[lm]; run_scripts/setup_env.sh installs it)")
        if sil not in symbols:
            raise ValueError(f"word boundary {sil!r} is not in the dictionary {list(symbols)[:8]}...")
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        if beam_size_token is not None and beam_size_token < 1:
            raise ValueError(f"beam_size_token must be >= 1 (or None: every letter), got {beam_size_token}")
        self.symbols, self.blank, self.sil = list(symbols), blank, list(symbols).index(sil)
        self.beam, self.beam_threshold = beam, beam_threshold
        self.beam_size_token = min(beam_size_token or len(self.symbols), len(self.symbols))
        token_dict = Dictionary()
        for s in self.symbols:
            token_dict.add_entry(s)
        self.lm = KenLM(str(arpa), token_dict)

    def __call__(self, lprobs, lm_weight, sil_score=0.0):
        """lprobs: (T, V) log-posteriors of one utterance -> best path, one token id per frame
        (repeats and blanks still in: ``decode.ctc_best_path`` merges them as for Viterbi)."""
        if lprobs.dim() != 2 or lprobs.shape[1] != len(self.symbols):
            raise ValueError(f"expected (T, {len(self.symbols)}) log-posteriors, got {tuple(lprobs.shape)}")
        if lprobs.shape[0] == 0:
            return []
        options = LexiconFreeDecoderOptions(
            beam_size=self.beam, beam_size_token=self.beam_size_token, beam_threshold=self.beam_threshold,
            lm_weight=lm_weight, sil_score=sil_score, log_add=False, criterion_type=CriterionType.CTC)
        decoder = LexiconFreeDecoder(options, self.lm, self.sil, self.blank, [])
        em = lprobs.detach().float().cpu().contiguous()  # flashlight reads the raw float32 buffer
        result = decoder.decode(em.data_ptr(), em.shape[0], em.shape[1])[0]
        return list(result.tokens[1:-1])  # flashlight pads the path with a word boundary at both ends


def grid(weights, sil_scores):
    """All (lm_weight, sil_score) pairs, in a fixed order (ties go to the first)."""
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"LM weight must be a finite number >= 0, got {w}")
    return [(w, s) for w in weights for s in sil_scores]
