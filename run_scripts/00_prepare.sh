#!/usr/bin/env bash
# Stage 0 (optional): your own recordings -> the corpus layout stage 01 reads.
# usage: run_scripts/00_prepare.sh AUDIO_DIR OUT_DIR [--transcripts LIST] [--layout auto|librispeech|list|per-file]
#          [--seed 0 --valid 0.05 --test 0.05 | --train-list F --valid-list F --test-list F] [--jobs N]
# AUDIO_DIR: any audio soundfile reads (wav, flac, ogg, mp3...), any rate, mono or stereo, with
# transcripts as LibriSpeech *.trans.txt, a '<audio><TAB><text>' / '|' / CSV list, or one .txt per file.
# OUT_DIR gets audio/*.flac (16 kHz mono), {train,valid,test}.tsv and .wrd (normalised letters:
# numbers spelled, brackets dropped, counted in OUT_DIR/prepare.log). Resumable; writes only into an
# empty OUT_DIR or one it started. Then: bash run_scripts/01_manifests.sh OUT_DIR, or CORPUS=OUT_DIR demo.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n 2,9p "$0"; exit 0; fi
[[ $# -ge 2 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
"$PY" -m fairseq_mamba.prepare "$@"
log "corpus written to $2: next, bash run_scripts/01_manifests.sh $2"
