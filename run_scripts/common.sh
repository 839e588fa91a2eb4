# Sourced by the stage scripts: repo root, venv python, small helpers.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || PY=$(command -v python3)
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(date +%H:%M:%S) $(basename "$0")] $*" >&2; }
# upstream <script> args... : fairseq's simple_kmeans script through our compat wrapper
upstream() { "$PY" -m fairseq_mamba.fairseq_fixes.upstream "$@"; }
abspath() { "$PY" -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"; }

# Stage bookkeeping. A piece of work (a stage, a shard) is complete when its MARKER file holds
# its STAMP: one line naming its inputs (with fingerprints) and settings, written last.
#   needs_run MARKER STAMP LABEL [OUTPUT...]
#     returns 1 (skip: "LABEL done, skipping") when MARKER holds STAMP; 0 (do the work) when there
#     is no MARKER, saying so when some OUTPUT already exists (a partial run, which the caller
#     redoes); when MARKER holds another STAMP the outputs came from other inputs: stops with an
#     error, unless FORCE=1, which removes the OUTPUTs (so nothing resumes from them), says so,
#     and has the caller redo the work.
#   mark_done MARKER STAMP: record completion, atomically.
#   fingerprint FILE...: 16 hex digits from the files' contents (size and mtime above 50 MB).
needs_run() {
  local marker=$1 stamp=$2 label=$3 out; shift 3
  if [[ -f "$marker" ]]; then
    [[ "$(cat "$marker")" == "$stamp" ]] && { log "$label done, skipping"; return 1; }
    if [[ "${FORCE:-0}" != 1 ]]; then
      echo "[$(basename "$0")] error: $label ($marker) was made from other inputs or settings" >&2
      echo "  made from: $(cat "$marker")" >&2
      echo "  asked for: $stamp" >&2
      echo "  Fix: use another output path, delete it, or set FORCE=1 to redo it (overwrites it)" >&2
      exit 1
    fi
    log "FORCE=1: redoing $label (was made from: $(cat "$marker"))"
    rm -rf -- "$marker" "$@"
    return 0
  fi
  for out in "$@"; do
    if [[ -e "$out" ]]; then log "$label is incomplete (no $(basename "$marker")): redoing it"; break; fi
  done
  return 0
}
mark_done() { echo "$2" >"$1.tmp.$$" && mv "$1.tmp.$$" "$1"; }
fingerprint() {
  local f
  for f in "$@"; do
    if [[ ! -e "$f" ]]; then echo "$f missing"
    elif (( $(stat -c %s "$f") < 50000000 )); then echo "$f $(md5sum <"$f")"
    else stat -c '%n %s %Y' "$f"; fi
  done | md5sum | cut -c1-16
}

# hydra_train TAG OUT CONFIG_DIR CONFIG [overrides...] (stages 05, 07): fairseq-hydra-train from the
# repo root into OUT (hydra.run.dir), its log appended to OUT/train.log, peak RSS in
# OUT/peak_rss_mb.txt, one progress line per logged update and validation on stderr
# (run_scripts/progress.py). An interrupted run resumes from OUT/checkpoints/checkpoint_last.pt.
# Fails, with the log's tail, unless the run finished.
hydra_train() {
  local tag=$1 out=$2 cdir=$3 cname=$4 total="" a; shift 4
  mkdir -p "$out"
  for a in "$@"; do if [[ "$a" == optimization.max_update=* ]]; then total=${a#*=}; fi; done
  (cd "$ROOT" && "$PY" "$ROOT/run_scripts/peak_rss.py" "$out/peak_rss_mb.txt" "$(dirname "$PY")/fairseq-hydra-train" \
    --config-dir "$cdir" --config-name "$cname" hydra.run.dir="$out" "$@") 2>&1 \
    | tee -a "$out/train.log" | "$PY" "$ROOT/run_scripts/progress.py" "$tag" "$total" >&2 || true
  [[ -f "$out/checkpoints/checkpoint_last.pt" ]] && grep -q "done training" "$out/train.log" \
    || { echo "$tag failed, see $out/train.log" >&2; tail -20 "$out/train.log" >&2; return 1; }
}

# feature_shards TSV_DIR FEAT_DIR NSHARD RANK WHAT (stages 02, 06): for each split of $SPLITS
# (default "train valid") and each shard r (RANK=all: every one), calls the caller's
# `dump SPLIT r` to write FEAT_DIR/{split}_{r}_{NSHARD}.{npy,len}, unless that shard is complete
# for the same WHAT (the features' inputs) and split manifest; a partial shard is redone.
feature_shards() {
  local tsv=$1 feat=$2 nshard=$3 rank=$4 what=$5 split r base stamp
  mkdir -p "$feat"
  for split in ${SPLITS:-train valid}; do
    stamp="$what on $tsv/$split.tsv ($(fingerprint "$tsv/$split.tsv"))"
    for r in $([[ "$rank" == all ]] && seq 0 $((nshard - 1)) || echo "$rank"); do
      base="$feat/${split}_${r}_${nshard}"
      needs_run "$base.done" "$stamp" "$split shard $r/$nshard" "$base.npy" "$base.len" || continue
      rm -f "$base.npy" "$base.len"
      log "$what: $split shard $r/$nshard"
      dump "$split" "$r"
      mark_done "$base.done" "$stamp"
    done
  done
}
