#!/usr/bin/env bash
# The whole pipeline for both models on the bundled corpus, then a report:
#   bash run_scripts/demo.sh            # from a fresh clone: sets up .venv, runs stages 01-08
# Environment knobs:
#   MODELS="mamba_hubert hubert"  models to run;      DEMO_SCALE=1  multiplies data and updates
#   CORPUS=examples/corpus/data   WORK=outputs/demo   (everything goes under WORK; re-running
#   skips finished stages, so an interrupted demo resumes)
#   TRAIN_UTTS, PT1_UPDATES, PT2_UPDATES, FT_UPDATES, K1, K2: override the scale-derived sizes.
# Writes WORK/report.md (+ PNG plots) and WORK/results.json, numbers parsed from this run's logs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
t_start=$(date +%s)
echo "[demo] setting up the environment (run_scripts/setup_env.sh)"
bash run_scripts/setup_env.sh
source run_scripts/common.sh
S=${DEMO_SCALE:-1}
MODELS=${MODELS:-mamba_hubert hubert}
CORPUS=${CORPUS:-$ROOT/examples/corpus/data}
W=$(abspath "${WORK:-outputs/demo}")
export TRAIN_UTTS=${TRAIN_UTTS:-$((200 * S))}
PT1=${PT1_UPDATES:-$((30 * S))}
PT2=${PT2_UPDATES:-$((15 * S))}
FT=${FT_UPDATES:-$((100 * S))}
K1=${K1:-50}; K2=${K2:-50}
NJ=${NJ:-2}  # parallel feature shards (2 cores)
mkdir -p "$W"
step() { echo "[demo $(date +%H:%M:%S) +$(( $(date +%s) - t_start ))s] $*"; }
mkdir -p "$W/logs"
# q NAME cmd...: run a stage with its output in WORK/logs/NAME.log (shown if it fails)
q() { local name=$1; shift
  "$@" >>"$W/logs/$name.log" 2>&1 || { tail -40 "$W/logs/$name.log" >&2; echo "[demo] $name failed, log: $W/logs/$name.log" >&2; exit 1; }; }
for s in train valid test; do
  [[ -f "$CORPUS/$s.tsv" ]] || { echo "[demo] $CORPUS/$s.tsv missing (bundled corpus not there?)" >&2; exit 1; }
done
cat >"$W/settings.json" <<JSON
{"DEMO_SCALE": $S, "MODELS": "$MODELS", "TRAIN_UTTS": $TRAIN_UTTS, "PT1_UPDATES": $PT1,
 "PT2_UPDATES": $PT2, "FT_UPDATES": $FT, "K1": $K1, "K2": $K2}
JSON
echo "[demo] scale $S: train utterances $TRAIN_UTTS, pre-train $PT1 + $PT2 updates, fine-tune $FT updates, models: $MODELS"

# parallel shards over NJ processes
shards() { local script=$1; shift; local pids=(); for r in $(seq 0 $((NJ - 1))); do
    bash "run_scripts/$script" "$@" "$NJ" "$r" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done; }
shards_h() { local ckpt=$1 data=$2 feat=$3; local pids=(); for r in $(seq 0 $((NJ - 1))); do
    OMP_NUM_THREADS=1 bash run_scripts/06_hubert_features.sh "$ckpt" "$data" "$feat" middle "$NJ" "$r" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done; }

step "01 manifests"; q 01_manifests bash run_scripts/01_manifests.sh "$CORPUS" "$W/data"; grep -h "utterances" "$W/logs/01_manifests.log" | tail -3
step "02 MFCC features ($NJ shards)"; OMP_NUM_THREADS=1 q 02_mfcc shards 02_mfcc_features.sh "$W/data" "$W/feat_mfcc"
step "03 k-means k=$K1 on MFCC"; KM_PERCENT=${KM_PERCENT:-0.5} q 03_kmeans_mfcc bash run_scripts/03_kmeans.sh "$W/feat_mfcc" "$W/km/mfcc_k$K1.bin" "$K1" "$NJ"
step "04 labels (iteration 1)"; q 04_labels_iter1 bash run_scripts/04_labels.sh "$W/feat_mfcc" "$W/km/mfcc_k$K1.bin" "$W/labels/iter1" "$NJ"
for m in $MODELS; do
  step "05 pre-train $m iteration 1 ($PT1 updates)"
  bash run_scripts/05_pretrain.sh "$m" 1 "$W/data" "$W/labels/iter1" "$W/pretrain/${m}_iter1" \
    optimization.max_update="$PT1" common.log_interval=5 lr_scheduler.warmup_updates=$((PT1 / 10 + 1)) \
    checkpoint.save_interval_updates="$PT1" dataset.validate_interval=1000
  step "06 $m iteration-1 features ($NJ shards)"
  q "06_features_$m" shards_h "$W/pretrain/${m}_iter1/checkpoints/checkpoint_last.pt" "$W/data" "$W/feat_${m}_iter1"
  step "03 k-means k=$K2 on $m features"
  KM_PERCENT=${KM_PERCENT:-0.5} q "03_kmeans_$m" bash run_scripts/03_kmeans.sh "$W/feat_${m}_iter1" "$W/km/${m}_iter1_k$K2.bin" "$K2" "$NJ"
  step "04 labels (iteration 2, $m)"
  q "04_labels_$m" bash run_scripts/04_labels.sh "$W/feat_${m}_iter1" "$W/km/${m}_iter1_k$K2.bin" "$W/labels/${m}_iter2" "$NJ"
  # Upstream HuBERT trains iteration 2 from scratch; with this small budget iteration 2 starts
  # from iteration 1's weights instead (possible when K1 == K2: same output shapes).
  warm=()
  if [[ "$K1" == "$K2" ]]; then
    warm=(checkpoint.restore_file="$W/pretrain/${m}_iter1/checkpoints/checkpoint_last.pt"
      checkpoint.reset_optimizer=true checkpoint.reset_dataloader=true checkpoint.reset_meters=true
      checkpoint.reset_lr_scheduler=true)
  fi
  step "05 pre-train $m iteration 2 ($PT2 updates${warm:+, warm start from iteration 1})"
  bash run_scripts/05_pretrain.sh "$m" 2 "$W/data" "$W/labels/${m}_iter2" "$W/pretrain/${m}_iter2" \
    optimization.max_update="$PT2" common.log_interval=5 lr_scheduler.warmup_updates=$((PT2 / 10 + 1)) \
    checkpoint.save_interval_updates="$PT2" dataset.validate_interval=1000 "${warm[@]}"
  step "07 fine-tune $m, letters CTC ($FT updates)"
  bash run_scripts/07_finetune.sh "$m" "$W/pretrain/${m}_iter2/checkpoints/checkpoint_last.pt" "$W/data" "$W/finetune/$m" \
    optimization.max_update="$FT" common.log_interval=10 checkpoint.save_interval_updates="$FT" \
    dataset.validate_interval=1000
  step "08 decode $m (test)"
  q "08_decode_$m" bash run_scripts/08_decode.sh "$W/finetune/$m/checkpoints/checkpoint_last.pt" "$W/data" test "$W/decode/$m"
  tail -1 "$W/logs/08_decode_$m.log"
done
step "report"
echo "$(( $(date +%s) - t_start ))" >"$W/wall_seconds.txt"
"$PY" run_scripts/make_report.py "$W" $MODELS
step "done: $W/report.md, $W/results.json"
