#!/usr/bin/env bash
# Stage 6: features of a pre-trained (iteration-1) checkpoint with fairseq's dump_hubert_feature.py.
# usage: run_scripts/06_hubert_features.sh CKPT MANIFEST_DIR FEAT_DIR [LAYER=middle] [NSHARD=1] [RANK=all]
# LAYER defaults to the middle encoder layer (encoder_layers // 2, at least 1), as HuBERT's
# layer 6 of 12. Then reuse 03_kmeans.sh and 04_labels.sh on FEAT_DIR for iteration-2 labels.
# Splits: $SPLITS (default "train valid"); shards with a .done marker are skipped.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
ckpt=$(abspath "$1"); tsv=$(abspath "$2"); feat=$(abspath "$3"); layer=${4:-middle}; nshard=${5:-1}; rank=${6:-all}
if [[ "$layer" == middle ]]; then
  layer=$("$PY" -c '
import sys, torch, fairseq_mamba
cfg = torch.load(sys.argv[1], map_location="cpu", weights_only=False)["cfg"]
print(max(1, cfg["model"]["encoder_layers"] // 2))' "$ckpt")
fi
mkdir -p "$feat"
ranks=$([[ "$rank" == all ]] && seq 0 $((nshard - 1)) || echo "$rank")
for split in ${SPLITS:-train valid}; do
  for r in $ranks; do
    base="$feat/${split}_${r}_${nshard}"
    if [[ -f "$base.done" ]]; then log "$split shard $r/$nshard done, skipping"; continue; fi
    rm -f "$base.npy" "$base.len"
    log "features of $ckpt layer $layer: $split shard $r/$nshard"
    upstream dump_hubert_feature "$tsv" "$split" "$ckpt" "$layer" "$nshard" "$r" "$feat" \
      --max_chunk "${MAX_CHUNK:-1600000}"
    touch "$base.done"
  done
done
