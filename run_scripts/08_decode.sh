#!/usr/bin/env bash
# Stage 8: Viterbi (best-path) CTC decoding without LM + WER/CER, with fairseq_mamba/decode.py.
# usage: run_scripts/08_decode.sh FT_CKPT MANIFEST_DIR SPLIT OUT_DIR
# fairseq's examples/speech_recognition/new/infer.py needs flashlight's decoder even for
# Viterbi (W2lViterbiDecoder imports flashlight), which is not installable here; decode.py does
# the same no-LM Viterbi: per-frame argmax of the CTC posteriors, merge repeats, drop blanks.
# Writes OUT_DIR/{SPLIT}.hyp, {SPLIT}.ref, {SPLIT}.json ({"wer":..,"cer":..}). Skipped when complete
# for the same checkpoint and data (OUT_DIR/{SPLIT}.done), refused for others unless FORCE=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 4 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
ckpt=$(abspath "$1"); data=$(abspath "$2"); split=$3; out=$(abspath "$4")
stamp="decode of $data/$split ($(fingerprint "$data/$split.tsv" "$data/$split.wrd" "$data/$split.ltr")) by $ckpt ($(fingerprint "$ckpt"))"
if ! needs_run "$out/$split.done" "$stamp" "decoding of $split in $out" "$out/$split.json" "$out/$split.hyp"; then
  cat "$out/$split.json"; exit 0
fi
mkdir -p "$out"
"$PY" -m fairseq_mamba.decode "$ckpt" "$data" "$split" "$out"
mark_done "$out/$split.done" "$stamp"
