#!/usr/bin/env bash
# Stage 2: MFCC (+delta, +delta-delta, 39-d) features with fairseq's dump_mfcc_feature.py.
# usage: run_scripts/02_mfcc_features.sh MANIFEST_DIR FEAT_DIR [NSHARD=1] [RANK=all]
# Splits: $SPLITS (default "train valid"). RANK=all runs every shard here one after another;
# a number runs only that shard (for parallel jobs). A shard is skipped when complete for the
# same manifest, redone when partial, and never overwritten from another manifest (FORCE=1 does).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 2 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
tsv=$(abspath "$1"); feat=$(abspath "$2"); nshard=${3:-1}; rank=${4:-all}
dump() { upstream dump_mfcc_feature "$tsv" "$1" "$nshard" "$2" "$feat"; }
feature_shards "$tsv" "$feat" "$nshard" "$rank" "MFCC"
