#!/usr/bin/env bash
# Stage 4: frame labels with fairseq's dump_km_label.py, merged to LAB_DIR/{split}.km, plus dict.km.txt.
# usage: run_scripts/04_labels.sh FEAT_DIR KM_PATH LAB_DIR [NSHARD=1] [RANK=all]
# Splits: $SPLITS (default "train valid"). Shards are skipped when done; {split}.km is merged once
# all NSHARD shards are there.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
feat=$(abspath "$1"); km=$(abspath "$2"); lab=$(abspath "$3"); nshard=${4:-1}; rank=${5:-all}
mkdir -p "$lab"
ranks=$([[ "$rank" == all ]] && seq 0 $((nshard - 1)) || echo "$rank")
for split in ${SPLITS:-train valid}; do
  for r in $ranks; do
    base="$lab/${split}_${r}_${nshard}"
    if [[ -f "$base.done" ]]; then log "$split shard $r/$nshard labelled, skipping"; continue; fi
    rm -f "$base.km"
    log "labels $split shard $r/$nshard"
    upstream dump_km_label "$feat" "$split" "$km" "$nshard" "$r" "$lab"
    touch "$base.done"
  done
  complete=1
  for r in $(seq 0 $((nshard - 1))); do [[ -f "$lab/${split}_${r}_${nshard}.done" ]] || complete=0; done
  if [[ $complete == 1 && ! -f "$lab/$split.km" ]]; then
    for r in $(seq 0 $((nshard - 1))); do cat "$lab/${split}_${r}_${nshard}.km"; done >"$lab/$split.km.tmp"
    mv "$lab/$split.km.tmp" "$lab/$split.km"
    log "merged $lab/$split.km ($(wc -l <"$lab/$split.km") utterances)"
  fi
done
k=$("$PY" -c 'import joblib,sys; print(joblib.load(sys.argv[1]).n_clusters)' "$km")
for i in $(seq 0 $((k - 1))); do echo "$i 1"; done >"$lab/dict.km.txt"
