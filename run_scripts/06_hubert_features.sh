#!/usr/bin/env bash
# Stage 6: features of a pre-trained (iteration-1) checkpoint with fairseq's dump_hubert_feature.py.
# usage: run_scripts/06_hubert_features.sh CKPT MANIFEST_DIR FEAT_DIR [LAYER=middle] [NSHARD=1] [RANK=all]
# LAYER defaults to the middle encoder layer (encoder_layers // 2, at least 1), as HuBERT's
# layer 6 of 12. Then reuse 03_kmeans.sh and 04_labels.sh on FEAT_DIR for iteration-2 labels.
# Splits: $SPLITS (default "train valid"). A shard is skipped when complete for the same
# checkpoint, layer and manifest, redone when partial, refused for other inputs unless FORCE=1.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
ckpt=$(abspath "$1"); tsv=$(abspath "$2"); feat=$(abspath "$3"); layer=${4:-middle}; nshard=${5:-1}; rank=${6:-all}
[[ -f "$ckpt" ]] || { echo "checkpoint $ckpt does not exist (run stage 05 first)" >&2; exit 1; }
if [[ "$layer" == middle ]]; then
  layer=$("$PY" -c '
import sys, torch, fairseq_mamba
cfg = torch.load(sys.argv[1], map_location="cpu", weights_only=False)["cfg"]
print(max(1, cfg["model"]["encoder_layers"] // 2))' "$ckpt")
fi
dump() { upstream dump_hubert_feature "$tsv" "$1" "$ckpt" "$layer" "$nshard" "$2" "$feat" --max_chunk "${MAX_CHUNK:-1600000}"; }
feature_shards "$tsv" "$feat" "$nshard" "$rank" "layer $layer of $ckpt ($(fingerprint "$ckpt"))"
