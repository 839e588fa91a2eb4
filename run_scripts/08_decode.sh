#!/usr/bin/env bash
# Stage 8: CTC decoding + WER/CER with fairseq_mamba/decoding/decode.py: Viterbi (no LM), then beam search
# with a letter 6-gram LM estimated from MANIFEST_DIR/train.ltr (no lexicon; LM weight and
# word-boundary score chosen on the valid split, never on SPLIT).
# usage: run_scripts/08_decode.sh FT_CKPT MANIFEST_DIR SPLIT OUT_DIR
# fairseq's examples/speech_recognition/new/infer.py needs flashlight's sequence bindings even for
# Viterbi (W2lViterbiDecoder), and a lexicon for its KenLM decoder; decode.py does the no-LM
# Viterbi itself (per-frame argmax of the CTC posteriors, merge repeats, drop blanks) and the LM
# search with flashlight-text's lexicon-free decoder (fairseq_mamba/decoding/lm_decoder.py).
# Writes OUT_DIR/{SPLIT}.hyp, {SPLIT}.lm.hyp, {SPLIT}.ref, {SPLIT}.json ({"wer":..,"cer":..,
# "lm": {"wer":..,"cer":..,...}}) and OUT_DIR/letters_6gram.arpa. Skipped when complete for the
# same checkpoint and data (OUT_DIR/{SPLIT}.done), refused for others unless FORCE=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 4 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
ckpt=$(abspath "$1"); data=$(abspath "$2"); split=$3; out=$(abspath "$4")
stamp="decode of $data/$split ($(fingerprint "$data/$split.tsv" "$data/$split.wrd" "$data/$split.ltr")) by $ckpt \
($(fingerprint "$ckpt")), letter 6-gram LM of $data/train.ltr ($(fingerprint "$data/train.ltr")) tuned on valid"
if ! needs_run "$out/$split.done" "$stamp" "decoding of $split in $out" "$out/$split.json" "$out/$split.hyp"; then
  cat "$out/$split.json"; exit 0
fi
mkdir -p "$out"
"$PY" -m fairseq_mamba.decoding.ngram_lm "$data/train.ltr" "$out/letters_6gram.arpa" --order 6
"$PY" -m fairseq_mamba.decoding.decode "$ckpt" "$data" "$split" "$out" --lm "$out/letters_6gram.arpa" --tune-split valid
mark_done "$out/$split.done" "$stamp"
