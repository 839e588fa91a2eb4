#!/usr/bin/env bash
# Creates (or checks) the project's virtual environment `.venv` at the repository root.
# Idempotent: a finished environment is recognised by a stamp and the script returns at once.
#
# Order matters on a CPU machine: torch first (the local CPU wheel), then numpy/cython, then
# fairseq-fixed built against them with --no-build-isolation (a build-isolated install would
# pull a CUDA torch), then everything else with torch pinned by a constraints file.
# A torch that is already importable in .venv (say a CUDA build you installed, or one seen
# through `python -m venv --system-site-packages .venv`) is kept as it is.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FAIRSEQ_MAMBA_VENV:-$root/.venv}
python=${PYTHON:-python3}
stamp="$venv/.fairseq_mamba_ready"
want=$(cat "$root/run_scripts/setup_env.sh" "$root/setup.py" | sha1sum | cut -c1-12)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup_env] preparing $venv (takes a few minutes the first time)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip=(pip_install)
pip_install() {  # quiet pip; drops this machine's harmless "local index location ignored" noise
  "$py" -m pip install --disable-pip-version-check -q --no-warn-script-location "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if ! "$py" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
torch_version=$("$py" -c "import torch; print(torch.__version__)")
constraints="$venv/constraints.txt"
echo "torch==$torch_version" >"$constraints"
"${pip[@]}" -c "$constraints" numpy cython setuptools wheel

if ! "$py" -c "import fairseq" 2>/dev/null; then
  # fairseq 0.12.2 neither builds nor imports on Python 3.11; fairseq-fixed does (same module name).
  "${pip[@]}" --no-build-isolation --no-deps "fairseq-fixed==0.12.3.1"
fi
"${pip[@]}" -c "$constraints" cffi "hydra-core==1.3.2" "omegaconf==2.3.0" regex sacrebleu tqdm \
  bitarray scikit-learn soundfile sentencepiece npy-append-array joblib matplotlib pytest pytest-xdist hypothesis \
  editdistance scipy "flashlight-text==0.0.7" ninja
# torchaudio: only its pure-Python parts are used (fairseq's upstream MFCC dump). The one
# release that accepts torch 2.13 is a CUDA build whose C++ extension cannot load on a CPU
# machine; --no-deps keeps torch, and fairseq_mamba.fairseq_fixes.upstream stubs the extension at run time.
if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchaudio') is None)"; then
  "${pip[@]}" --no-deps "torchaudio==2.11.0"
fi
# mamba-ssm's pure-PyTorch selective_scan_ref, the ground truth our scan is tested and benchmarked
# against, on a CPU torch only: built without its CUDA kernels (MAMBA_SKIP_CUDA_BUILD) and without
# deps (it would ask for triton and another torch). With a CUDA torch, install the real kernels
# instead: pip install -e .[cuda].
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" &&
  ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mamba_ssm') is None)"; then
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "${pip[@]}" --no-build-isolation --no-deps \
    "mamba-ssm==2.3.2.post1" "einops==0.8.2"
fi
"${pip[@]}" -c "$constraints" --no-build-isolation --no-deps -e "$root"
# The compiled CPU kernels (scan, causal conv), built now (about 40 CPU seconds, cached under
# TORCH_EXTENSIONS_DIR) rather than at the first call; a changed source gets a new build. A failed
# build is not fatal: fairseq_mamba logs one warning and uses the chunked scan and F.conv1d.
"$py" -c "from fairseq_mamba.ops.scan_kernel import load_kernel; load_kernel()" ||
  echo "[setup_env] the CPU kernels did not build; the chunked scan and F.conv1d will be used" >&2

if "$py" -m pip list 2>/dev/null | grep -qi '^nvidia-' && ! "$py" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "[setup_env] CUDA packages appeared beside a CPU torch; something asked for another torch" >&2
  exit 1
fi
echo "$want" >"$stamp"
echo "[setup_env] ready: torch $torch_version, $("$py" -c 'import fairseq; print("fairseq", fairseq.__version__)' 2>/dev/null)" >&2
