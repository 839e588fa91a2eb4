#!/usr/bin/env bash
# Stage 9: layer-wise mutual information (README "Mutual-information analysis") of checkpoints on one split.
# usage: run_scripts/09_mi_analysis.sh MANIFEST_TSV OUT_DIR [NAME=]CKPT [[NAME=]CKPT ...]
# Targets besides layer 0's code and MFCC (each optional): $KMEANS, an MFCC k-means model (03_kmeans.sh on
# MFCC features; units = its cluster of each frame's MFCC), or $UNITS, a unit label file (04_labels.sh);
# $PHONES, 100 Hz phone labels (e.g. examples/corpus/data/test.phn). $MI_JOBS estimator processes
# (default 2); $MI_ARGS more options of `python -m fairseq_mamba.analysis.layer_mi` (e.g. "--repeats 3
# --layer0-codes 32": the cells of the layer-0 codebook, the layer0 target; "--targets layer0 mfcc input": input =
# the seed paper's MINE-DV per utterance). CKPT: pre-trained, hubert_ctc, hubert_ctc_head or hubert_enhancer.
# Writes OUT_DIR/layer_mi.csv, layer_mi.json, layer_mi.png; skipped when complete for the same
# inputs and settings (OUT_DIR/.done), refused for others unless FORCE=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n 2,11p "$0"; exit 0; fi
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
tsv=$(abspath "$1"); out=$(abspath "$2"); shift 2
opts=(); inputs=("$tsv")
for pair in "kmeans:${KMEANS:-}" "units:${UNITS:-}" "phones:${PHONES:-}"; do
  [[ -n "${pair#*:}" ]] || continue
  opts+=("--${pair%%:*}" "$(abspath "${pair#*:}")"); inputs+=("${pair#*:}")
done
for ckpt in "$@"; do inputs+=("${ckpt#*=}"); done
stamp="MI of $* on $tsv ${opts[*]} jobs:${MI_JOBS:-2} ${MI_ARGS:-} ($(fingerprint "${inputs[@]}"))"
needs_run "$out/.done" "$stamp" "MI analysis in $out" "$out/layer_mi.json" || exit 0
mkdir -p "$out"
log "MI analysis of $# checkpoint(s) on $tsv -> $out"
# shellcheck disable=SC2086  # MI_ARGS is a list of options
OMP_NUM_THREADS=1 "$PY" -m fairseq_mamba.analysis.layer_mi --manifest "$tsv" --out "$out" --jobs "${MI_JOBS:-2}" \
  "${opts[@]}" ${MI_ARGS:-} -- "$@"  # --: a list option in MI_ARGS (--targets) must not take the checkpoints
mark_done "$out/.done" "$stamp"
