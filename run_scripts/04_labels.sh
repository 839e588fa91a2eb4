#!/usr/bin/env bash
# Stage 4: frame labels with fairseq's dump_km_label.py, merged to LAB_DIR/{split}.km, plus dict.km.txt.
# usage: run_scripts/04_labels.sh FEAT_DIR KM_PATH LAB_DIR [NSHARD=1] [RANK=all]
# Splits: $SPLITS (default "train valid"). A shard is skipped when complete for the same features
# and k-means model, redone when partial, refused for other inputs unless FORCE=1; {split}.km is
# merged once all NSHARD shards are there (again when they change).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
feat=$(abspath "$1"); km=$(abspath "$2"); lab=$(abspath "$3"); nshard=${4:-1}; rank=${5:-all}
mkdir -p "$lab"
ranks=$([[ "$rank" == all ]] && seq 0 $((nshard - 1)) || echo "$rank")
km_print=$(fingerprint "$km")
for split in ${SPLITS:-train valid}; do
  for r in $ranks; do
    base="$lab/${split}_${r}_${nshard}"; fbase="$feat/${split}_${r}_${nshard}"
    stamp="labels of $fbase ($(fingerprint "$fbase.len" "$fbase.npy")) by $km ($km_print)"
    needs_run "$base.done" "$stamp" "$split shard $r/$nshard labels" "$base.km" || continue
    rm -f "$base.km"
    log "labels $split shard $r/$nshard"
    upstream dump_km_label "$feat" "$split" "$km" "$nshard" "$r" "$lab"
    mark_done "$base.done" "$stamp"
  done
  parts=(); complete=1
  for r in $(seq 0 $((nshard - 1))); do
    parts+=("$lab/${split}_${r}_${nshard}.km"); [[ -f "$lab/${split}_${r}_${nshard}.done" ]] || complete=0
  done
  [[ $complete == 1 ]] || continue
  stamp="merge of $nshard shards ($(fingerprint "${parts[@]}"))"
  needs_run "$lab/$split.km.done" "$stamp" "$lab/$split.km" "$lab/$split.km" || continue
  cat "${parts[@]}" >"$lab/$split.km.tmp.$$"  # per-process temp: parallel ranks may both merge
  mv "$lab/$split.km.tmp.$$" "$lab/$split.km"
  mark_done "$lab/$split.km.done" "$stamp"
  log "merged $lab/$split.km ($(wc -l <"$lab/$split.km") utterances)"
done
k=$("$PY" -c 'import joblib,sys; print(joblib.load(sys.argv[1]).n_clusters)' "$km")
for i in $(seq 0 $((k - 1))); do echo "$i 1"; done >"$lab/dict.km.txt.tmp.$$"
mv "$lab/dict.km.txt.tmp.$$" "$lab/dict.km.txt"
