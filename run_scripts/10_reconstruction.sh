#!/usr/bin/env bash
# Stage 10: the reconstruction model (speech enhancement, README "Reconstruction model"): train, then score the test split.
# usage: run_scripts/10_reconstruction.sh MODEL MANIFEST_DIR OUT_DIR [hydra overrides...]
#   MODEL: mamba_hubert | hubert (the encoder);  MANIFEST_DIR (stage 1) holds {train,valid,test}.tsv.
#   Config: examples/reconstruction/${CONFIG:-MODEL_tiny_cpu}.yaml (task speech_enhancement, model hubert_enhancer).
# Writes OUT_DIR/checkpoints/checkpoint_{best,last}.pt, OUT_DIR/train.log, OUT_DIR/peak_rss_mb.txt and
# OUT_DIR/test.json (python -m fairseq_mamba.inference.evaluate_enhancement: log-spectral distance, noisy and enhanced;
# its log in OUT_DIR/eval.log).
# Skipped when OUT_DIR/.done records the same inputs and settings (common.sh, needs_run);
# an interrupted run resumes from checkpoint_last.pt.
set -euo pipefail
source "$(dirname "$0")/common.sh"
[[ $# -ge 3 ]] || { sed -n 3,3p "$0" >&2; exit 2; }
model=$1; data=$(abspath "$2"); out=$(abspath "$3"); shift 3
case $model in mamba_hubert|hubert) ;; *) echo "MODEL must be mamba_hubert or hubert" >&2; exit 2;; esac
config=${CONFIG:-${model}_tiny_cpu}
stamp="reconstruction $model $config $* on $data ($(fingerprint "$data/train.tsv" "$data/valid.tsv" "$data/test.tsv"))"
needs_run "$out/.done" "$stamp" "reconstruction model in $out" "$out/checkpoints" "$out/train.log" \
  "$out/peak_rss_mb.txt" "$out/test.json" "$out/eval.log" || exit 0
log "speech enhancement, $model encoder ($config) -> $out"
hydra_train "enhance $model" "$out" examples/reconstruction "$config" task.data="$data" common.user_dir=fairseq_mamba "$@"
"$PY" -m fairseq_mamba.inference.evaluate_enhancement "$out/checkpoints/checkpoint_last.pt" "$data" --split test \
  --out "$out/test.json.tmp" >/dev/null 2>"$out/eval.log" || { tail -20 "$out/eval.log" >&2; exit 1; }
mv "$out/test.json.tmp" "$out/test.json"
log "$model test: $(tr -d '\n ' <"$out/test.json" | grep -o '"lsd_noisy_db":[^,]*,"lsd_enhanced_db":[^,]*,"lsd_improvement_db":[^,]*' | head -1)"
mark_done "$out/.done" "$stamp"
