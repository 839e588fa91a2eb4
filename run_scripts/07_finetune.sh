#!/usr/bin/env bash
# Stage 7: letters-CTC fine-tuning with fairseq's hubert_ctc, model.w2v_path = our checkpoint.
# usage: run_scripts/07_finetune.sh MODEL CKPT MANIFEST_DIR OUT_DIR [hydra overrides...]
#   MANIFEST_DIR (stage 1) holds {train,valid}.tsv, .ltr and dict.ltr.txt.
#   Config: examples/finetune/${CONFIG:-MODEL_tiny_cpu}.yaml (also *_base_10h / *_base_100h).
# Writes OUT_DIR/checkpoints/checkpoint_{best,last}.pt, OUT_DIR/train.log, OUT_DIR/peak_rss_mb.txt.
# Plain fairseq-hydra-train: importing the user dir (common.user_dir=fairseq_mamba) fixes fairseq
# 0.12's hubert_ctc (its encoder reads cfg.autoregressive, missing from HubertCtcConfig).
# Skipped when OUT_DIR/.done records the same inputs and settings (common.sh, needs_run);
# an interrupted run resumes from checkpoint_last.pt.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 4 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
model=$1; ckpt=$(abspath "$2"); data=$(abspath "$3"); out=$(abspath "$4"); shift 4
config=${CONFIG:-${model}_tiny_cpu}
stamp="finetune $model $config $* from $ckpt ($(fingerprint "$ckpt")) \
on $data ($(fingerprint "$data/train.tsv" "$data/train.ltr" "$data/dict.ltr.txt"))"
# FORCE=1 removes the old run's checkpoints and log, so it starts afresh instead of resuming
needs_run "$out/.done" "$stamp" "fine-tuning in $out" "$out/checkpoints" "$out/train.log" "$out/peak_rss_mb.txt" || exit 0
log "fine-tuning $ckpt ($config) -> $out"
hydra_train "fine-tune $model" "$out" examples/finetune "$config" task.data="$data" \
  task.label_dir="$data" model.w2v_path="$ckpt" common.user_dir=fairseq_mamba "$@"
mark_done "$out/.done" "$stamp"
