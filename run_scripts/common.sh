# Sourced by the stage scripts: repo root, venv python, small helpers.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || PY=$(command -v python3)
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(date +%H:%M:%S) $(basename "$0")] $*" >&2; }
# upstream <script> args... : fairseq's simple_kmeans script through our compat wrapper
upstream() { "$PY" -m fairseq_mamba.upstream "$@"; }
abspath() { "$PY" -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
