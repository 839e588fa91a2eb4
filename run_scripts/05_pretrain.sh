#!/usr/bin/env bash
# Stage 5: HuBERT-style pre-training with fairseq-hydra-train and our configs.
# usage: run_scripts/05_pretrain.sh MODEL ITER MANIFEST_DIR LABEL_DIR OUT_DIR [hydra overrides...]
#   MODEL: mamba_hubert | hubert | causal_hubert | mamba2_hubert (mamba_hubert, mamba_version=2);  ITER: 1 (MFCC k-means labels) | 2 (labels from iter-1 features)
#   LABEL_DIR holds {train,valid}.km and dict.km.txt. Config: examples/pretrain/${CONFIG:-MODEL_tiny_cpu}.yaml
# Writes OUT_DIR/checkpoints/checkpoint_last.pt, OUT_DIR/train.log, OUT_DIR/peak_rss_mb.txt.
# Skipped when OUT_DIR/.done records the same inputs and settings (common.sh, needs_run);
# an interrupted run resumes from checkpoint_last.pt.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 5 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
model=$1; iter=$2; data=$(abspath "$3"); labels=$(abspath "$4"); out=$(abspath "$5"); shift 5
case $model in mamba_hubert|hubert|causal_hubert|mamba2_hubert) ;; *) echo "MODEL must be mamba_hubert, hubert, causal_hubert or mamba2_hubert" >&2; exit 2;; esac
case $iter in 1|2) ;; *) echo "ITER must be 1 or 2" >&2; exit 2;; esac
config=${CONFIG:-${model}_tiny_cpu}
stamp="pretrain $model iter $iter $config $* on $data ($(fingerprint "$data/train.tsv" "$data/valid.tsv")) \
labels $labels ($(fingerprint "$labels/train.km" "$labels/valid.km" "$labels/dict.km.txt"))"
# FORCE=1 removes the old run's checkpoints and log, so it starts afresh instead of resuming
needs_run "$out/.done" "$stamp" "pre-training in $out" "$out/checkpoints" "$out/train.log" "$out/peak_rss_mb.txt" || exit 0
# label rate from the labels themselves: 100 Hz for MFCC labels (iteration 1), the model's frame
# rate (e.g. 50 Hz for a 320x conv stride) for labels from its own features (iteration 2)
rate=$("$PY" - "$data/train.tsv" "$labels/train.km" <<'PYEOF'
import sys
lines = open(sys.argv[1]).read().splitlines()[1:]
secs = sum(int(l.split("\t")[1]) for l in lines) / 16000
frames = sum(len(l.split()) for l in open(sys.argv[2]))
rate = frames / secs
print(min((100, 50, 25, 200), key=lambda r: abs(r - rate)))
PYEOF
)
log "pre-training $model iteration $iter ($config, labels at $rate Hz) -> $out"
hydra_train "pre-train $model iter $iter" "$out" examples/pretrain "$config" task.data="$data" \
  task.label_dir="$labels" common.user_dir=fairseq_mamba model.label_rate="$rate" "$@"
mark_done "$out/.done" "$stamp"
