#!/usr/bin/env bash
# Stage 3: k-means on the train features with fairseq's learn_kmeans.py (MiniBatchKMeans).
# usage: run_scripts/03_kmeans.sh FEAT_DIR KM_PATH N_CLUSTERS [NSHARD=1]
# Uses all NSHARD train shards in FEAT_DIR; $KM_PERCENT (default -1: all frames) sub-samples,
# $KM_BATCH (default 10000) is the mini-batch size. KM_PATH is written atomically; skipped when
# complete for the same features and settings (KM_PATH.done), refused for others unless FORCE=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
feat=$(abspath "$1"); km=$(abspath "$2"); k=$3; nshard=${4:-1}
shards=(); for r in $(seq 0 $((nshard - 1))); do shards+=("$feat/train_${r}_${nshard}.len" "$feat/train_${r}_${nshard}.npy"); done
stamp="k-means k=$k percent=${KM_PERCENT:--1} batch=${KM_BATCH:-10000} n_init=${KM_N_INIT:-3} of $feat ($(fingerprint "${shards[@]}"))"
needs_run "$km.done" "$stamp" "k-means $km" "$km" || exit 0
mkdir -p "$(dirname "$km")"
log "k-means k=$k on $feat (train, $nshard shards)"
upstream learn_kmeans "$feat" train "$nshard" "$km.tmp" "$k" --percent "${KM_PERCENT:--1}" \
  --batch_size "${KM_BATCH:-10000}" --n_init "${KM_N_INIT:-3}"
mv "$km.tmp" "$km"
mark_done "$km.done" "$stamp"
