#!/usr/bin/env bash
# The whole pipeline for both models on the bundled corpus, then a report:
#   bash run_scripts/demo.sh            # from a fresh clone: sets up .venv, runs stages 01-08
# Environment knobs:
#   DEMO_SCALE=1   multiplies every training stage's updates (DEMO_SCALE=3: see README for its WER)
#   MODELS="mamba_hubert hubert"   (also causal_hubert, mamba2_hubert) PARALLEL=1: the models' stages 05-08 run side by side, one core and
#                  one thread each (0: one model after the other with OMP_NUM_THREADS, default 2)
#   CORPUS=examples/corpus/data   WORK=outputs/demo   (everything goes under WORK; re-running skips
#                  finished stages, so an interrupted demo resumes)
#   PT1_UPDATES, PT2_UPDATES, FT_UPDATES, K1, K2, TRAIN_UTTS: override the scale-derived sizes.
# Stage 09 (MI per layer of every checkpoint) ends each model's chain (WORK/mi/MODEL/). Writes WORK/report.md (+ PNG plots), WORK/results.json and WORK/details.json, numbers parsed from
# this run's logs; WORK/stage_seconds.tsv holds every stage's wall seconds. A resumed demo appends
# its seconds (setup_seconds.txt, wall_seconds.txt, one line per invocation), and the report sums them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
t_start=$(date +%s)
echo "[demo] setting up the environment (run_scripts/setup_env.sh)"
bash run_scripts/setup_env.sh
source run_scripts/common.sh
S=${DEMO_SCALE:-1}
MODELS=${MODELS:-mamba_hubert hubert}
PARALLEL=${PARALLEL:-1}
CORPUS=${CORPUS:-$ROOT/examples/corpus/data}
W=$(abspath "${WORK:-outputs/demo}")
# Sizes at scale 1, chosen to fit 45 minutes on 2 cores with every stage of the paper's experiment (README, "The demo").
export TRAIN_UTTS=${TRAIN_UTTS:-}  # empty: all 556 train utterances
PT1=${PT1_UPDATES:-$((500 * S))}
PT2=${PT2_UPDATES:-$((250 * S))}
FT=${FT_UPDATES:-$((1000 * S))}  # each of the three ASR variants per model
HEAD=${HEAD:-conformer}  # the extra module of the paper's experiment: conformer | transformer | bimamba
RECON=${RECON_UPDATES:-$((300 * S))}  # stage 10, the reconstruction (speech enhancement) models
# stage 09 (layer_mi --targets): our estimator (layer0) and the paper's procedure (input); phones (the
# bundled corpus's labels), mfcc and units cost ~1/3 of the stage each: MI_TARGETS="layer0 phones input"
MI_TARGETS=${MI_TARGETS:-layer0 input}
K1=${K1:-50}; K2=${K2:-50}
mkdir -p "$W/logs"
for s in train valid test; do
  [[ -f "$CORPUS/$s.tsv" ]] || { echo "[demo] $CORPUS/$s.tsv missing (bundled corpus not there?)" >&2; exit 1; }
done
cat >"$W/settings.json" <<JSON
{"DEMO_SCALE": $S, "MODELS": "$MODELS", "PARALLEL": $PARALLEL, "TRAIN_UTTS": "${TRAIN_UTTS:-all}",
 "PT1_UPDATES": $PT1, "PT2_UPDATES": $PT2, "FT_UPDATES": $FT, "K1": $K1, "K2": $K2, "HEAD": "$HEAD",
 "RECON_UPDATES": $RECON, "MI_TARGETS": "$MI_TARGETS"}
JSON
uptime >>"$W/load.txt"
echo "[demo] scale $S: pre-train $PT1 + $PT2 updates, fine-tune $FT updates, models: $MODELS (parallel: $PARALLEL)"
echo "$(( $(date +%s) - t_start ))" >>"$W/setup_seconds.txt"

step() { echo "[demo $(date +%H:%M:%S) +$(( $(date +%s) - t_start ))s] $*"; }
# timed NAME cmd...: run a stage, appending "NAME wall user sys" seconds (its processes and their
# children) to WORK/stage_seconds.tsv: CPU seconds are what a quiet machine's wall time would be.
# In a subshell because bash's `time` adds the CPU of every child reaped while it runs: in the chain's
# own shell a background job ending meanwhile (the scratch fine-tuning, stage 10) was counted too.
timed() { local name=$1; shift
  ( TIMEFORMAT="$name	%R	%U	%S"; time "$@" 2>&3 ) 3>&2 2>>"$W/stage_seconds.tsv"; }
# q NAME cmd...: a timed stage with its output in WORK/logs/NAME.log (shown if it fails)
q() { local name=$1; shift
  timed "$name" "$@" >>"$W/logs/$name.log" 2>&1 || {
    tail -40 "$W/logs/$name.log" >&2; echo "[demo] $name failed, log: $W/logs/$name.log" >&2; return 1; }; }
# shards NJ script args...: NJ parallel shards of a stage script
shards() { local nj=$1 script=$2; shift 2; local pids=() r p rc=0
  for r in $(seq 0 $((nj - 1))); do bash "run_scripts/$script" "$@" "$nj" "$r" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done; return $rc; }

step "01 manifests"; q 01_manifests bash run_scripts/01_manifests.sh "$CORPUS" "$W/data"
grep -h "utterances" "$W/logs/01_manifests.log" | tail -3
step "02 MFCC features (2 shards)"; OMP_NUM_THREADS=1 q 02_mfcc shards 2 02_mfcc_features.sh "$W/data" "$W/feat_mfcc"
step "03 k-means k=$K1 on MFCC"; KM_PERCENT=${KM_PERCENT:-0.5} q 03_kmeans_mfcc bash run_scripts/03_kmeans.sh "$W/feat_mfcc" "$W/km/mfcc_k$K1.bin" "$K1" 2
# 04 runs its shards in one process: each shard's job merges the shards when all are there
step "04 labels (iteration 1)"; q 04_labels_iter1 bash run_scripts/04_labels.sh "$W/feat_mfcc" "$W/km/mfcc_k$K1.bin" "$W/labels/iter1" 2

# chain MODEL NJ: stages 05-08 of one model (NJ feature shards); the from-scratch run starts beside it
# once iteration 1 is trained, the fine-tuning variants follow iteration 2
chain() { local m=$1 nj=$2 ck1="$W/pretrain/${1}_iter1/checkpoints/checkpoint_last.pt"
  local recon_pid=""
  if [[ -f "examples/reconstruction/${m}_tiny_cpu.yaml" ]]; then
    step "10 reconstruction model (speech enhancement), $m encoder ($RECON updates), beside the chain"
    timed "10_reconstruction_$m" bash run_scripts/10_reconstruction.sh "$m" "$W/data" "$W/reconstruction/$m" \
      optimization.max_update="$RECON" common.log_interval=$((RECON / 5 > 0 ? RECON / 5 : 1)) \
      checkpoint.save_interval_updates="$RECON" >>"$W/logs/10_reconstruction_$m.log" 2>&1 & recon_pid=$!
  else
    step "10: no reconstruction config for $m (examples/reconstruction/ has mamba_hubert and hubert)"
  fi
  step "05 pre-train $m iteration 1 ($PT1 updates)"
  timed "05_pretrain_${m}_iter1" bash run_scripts/05_pretrain.sh "$m" 1 "$W/data" "$W/labels/iter1" "$W/pretrain/${m}_iter1" \
    optimization.max_update="$PT1" common.log_interval=$((PT1 / 8 > 0 ? PT1 / 8 : 1)) \
    lr_scheduler.warmup_updates=$((PT1 / 10 + 1)) checkpoint.save_interval_updates="$PT1" dataset.validate_interval=1000
  finetune "$m" scratch & local scratch_pid=$!
  step "06 $m iteration-1 features"
  OMP_NUM_THREADS=1 q "06_features_$m" shards "$nj" 06_hubert_features.sh "$ck1" "$W/data" "$W/feat_${m}_iter1" middle
  step "03 k-means k=$K2 on $m features"
  KM_PERCENT=${KM_PERCENT:-0.5} q "03_kmeans_$m" bash run_scripts/03_kmeans.sh "$W/feat_${m}_iter1" "$W/km/${m}_iter1_k$K2.bin" "$K2" "$nj"
  step "04 labels (iteration 2, $m)"
  q "04_labels_$m" bash run_scripts/04_labels.sh "$W/feat_${m}_iter1" "$W/km/${m}_iter1_k$K2.bin" "$W/labels/${m}_iter2" "$nj"
  # Upstream HuBERT trains iteration 2 from scratch; with this small budget iteration 2 starts
  # from iteration 1's weights instead (possible when K1 == K2: same output shapes). fairseq loads
  # finetune_from_model only while the run has no checkpoint_last.pt, so a killed iteration 2 resumes.
  local warm=()
  if [[ "$K1" == "$K2" ]]; then warm=(checkpoint.finetune_from_model="$ck1"); fi
  step "05 pre-train $m iteration 2 ($PT2 updates${warm:+, warm start from iteration 1})"
  timed "05_pretrain_${m}_iter2" bash run_scripts/05_pretrain.sh "$m" 2 "$W/data" "$W/labels/${m}_iter2" "$W/pretrain/${m}_iter2" \
    optimization.max_update="$PT2" common.log_interval=$((PT2 / 4 > 0 ? PT2 / 4 : 1)) \
    lr_scheduler.warmup_updates=$((PT2 / 10 + 1)) checkpoint.save_interval_updates="$PT2" dataset.validate_interval=1000 \
    "${warm[@]}"
  finetune "$m" alone
  finetune "$m" "$HEAD"
  wait "$scratch_pid"
  [[ -z "$recon_pid" ]] || wait "$recon_pid" || { tail -20 "$W/logs/10_reconstruction_$m.log" >&2; return 1; }
  mutual_information "$m"
}

# Stage 09 on every checkpoint of model m, as soon as its chain is done: the first chain to finish
# fills the core that the other chain's last fine-tuning leaves idle.
mutual_information() { local m=$1 ckpts phones=""
  ckpts=("$m=$W/pretrain/${m}_iter2/checkpoints/checkpoint_last.pt"
    "${m}_alone=$W/finetune/$m/checkpoints/checkpoint_best.pt" "${m}_$HEAD=$W/finetune/${m}_$HEAD/checkpoints/checkpoint_best.pt"
    "${m}_scratch=$W/finetune/${m}_scratch/checkpoints/checkpoint_best.pt")
  [[ ! -f "$W/reconstruction/$m/.done" ]] || ckpts+=("${m}_recon=$W/reconstruction/$m/checkpoints/checkpoint_last.pt")
  if [[ -f "$CORPUS/test.phn" ]]; then phones="$CORPUS/test.phn"; fi
  step "09 mutual information per layer of $m's ${#ckpts[@]} checkpoints (test split; targets: $MI_TARGETS)"
  KMEANS="$W/km/mfcc_k$K1.bin" PHONES="$phones" MI_JOBS=2 MI_ARGS="--targets $MI_TARGETS" \
    q "09_mi_$m" bash run_scripts/09_mi_analysis.sh "$W/data/test.tsv" "$W/mi/$m" "${ckpts[@]}"
}

# finetune MODEL VARIANT: stage 07 + 08 of one ASR variant, the same data, schedule, seed and decoding
# for every variant (the paper's experiment): alone = hubert_ctc on the iteration-2 checkpoint (WORK/
# finetune/MODEL); conformer|transformer|bimamba = hubert_ctc_head with one such layer on top (WORK/
# finetune/MODEL_VARIANT); scratch = hubert_ctc with no_pretrained_weights (the iteration-1 checkpoint
# gives only the architecture).
finetune() { local m=$1 v=$2 ck="$W/pretrain/${1}_iter2/checkpoints/checkpoint_last.pt" config=${1}_tiny_cpu
  local name=${m}_$v extra=()
  case $v in
    alone) name=$m ;;
    scratch) ck="$W/pretrain/${m}_iter1/checkpoints/checkpoint_last.pt"; extra=(model.no_pretrained_weights=true) ;;
    *) config=head_tiny_cpu; extra=(model.head_type="$v") ;;
  esac
  step "07 fine-tune $m ($v), letters CTC ($FT updates)"
  CONFIG=$config timed "07_finetune_$name" bash run_scripts/07_finetune.sh "$m" "$ck" "$W/data" "$W/finetune/$name" \
    optimization.max_update="$FT" common.log_interval=$((FT / 10 > 0 ? FT / 10 : 1)) checkpoint.save_interval_updates="$FT" \
    dataset.validate_interval=1000 dataset.validate_interval_updates=$((FT / 4 > 0 ? FT / 4 : 1)) "${extra[@]}"
  step "08 decode $m ($v, test)"
  q "08_decode_$name" bash run_scripts/08_decode.sh "$W/finetune/$name/checkpoints/checkpoint_best.pt" "$W/data" test "$W/decode/$name"
  step "$m ($v): test $("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); l = r.get("lm", {})
print("WER %.2f CER %.2f, with LM: WER %s CER %s" % (r["wer"], r["cer"], l.get("wer"), l.get("cer")))' "$W/decode/$name/test.json")"
}

if [[ "$PARALLEL" == 1 ]]; then
  # Two single-threaded processes use 2 cores better than one with 2 threads (small ops, OpenMP barriers).
  pids=()
  for m in $MODELS; do OMP_NUM_THREADS=1 chain "$m" 1 & pids+=($!); done
  trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
  rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
  [[ $rc == 0 ]] || { echo "[demo] a model's stages failed (see above)" >&2; exit 1; }
else
  for m in $MODELS; do chain "$m" 2; done
fi
step "report"
uptime >>"$W/load.txt"
echo "$(( $(date +%s) - t_start ))" >>"$W/wall_seconds.txt"
"$PY" run_scripts/make_report.py "$W" $MODELS
step "done: $W/report.md, $W/results.json"
