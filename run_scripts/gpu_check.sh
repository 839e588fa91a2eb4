#!/usr/bin/env bash
# The GPU check (issue #17), for one CUDA GPU, under 8 minutes: installs the mamba-ssm and
# causal-conv1d kernels if they are missing (or says exactly what it lacked), runs the GPU tests,
# then run_scripts/gpu_check.py: our scan against selective_scan_fn, each layer type's kernel path
# against its PyTorch path (fp32, bf16), two fp16 updates of both base configs, the encoder-layer
# speed table against fairseq's attention layer at 500-8000 frames.
# Usage: bash run_scripts/gpu_check.sh [OUT_DIR]     (default outputs/gpu_check)
# On a CPU: .venv/bin/python run_scripts/gpu_check.py --cpu-dry-run OUT_DIR runs the same steps
# at tiny sizes with CPU stand-ins for the kernels.
# Writes OUT_DIR/gpu_check.md (+ .json), pytest.log, pip_install.log; exits 1 if a check failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
out=$(abspath "${1:-$ROOT/outputs/gpu_check}")
mkdir -p "$out"
cd "$ROOT"
lacking() { echo "gpu_check: cannot run: $*" | tee "$out/gpu_check.md" >&2; exit 1; }

command -v nvidia-smi >/dev/null || lacking "no nvidia-smi (no NVIDIA driver on this machine)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/nvidia_smi.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  lacking "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no GPU" \
    "(a CPU build, or a CUDA build older than the driver): install a CUDA torch into $PY's environment"

kernels_ok() {
  "$PY" -c "from fairseq_mamba.ops import HAS_CUDA_CONV, HAS_CUDA_SCAN; import sys; sys.exit(0 if HAS_CUDA_SCAN and HAS_CUDA_CONV else 1)" 2>/dev/null
}
if ! kernels_ok; then
  # Built against the torch that is there (no build isolation); a CPU-only mamba-ssm install
  # (setup_env.sh on a CPU machine) is replaced. pip fetches a prebuilt wheel or compiles with nvcc.
  log "kernels missing: pip install mamba-ssm and causal-conv1d for torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  # Sized for prebuilt wheels (a minute or two); compiling them with nvcc takes far longer.
  if ! timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall \
      --no-cache-dir "causal-conv1d==1.7.0" "mamba-ssm==2.3.2.post1" >"$out/pip_install.log" 2>&1; then
    log "pip install failed or timed out; the last lines of $out/pip_install.log:"
    tail -5 "$out/pip_install.log" >&2
  fi
  kernels_ok || log "kernels still missing: gpu_check.md lists which module fails to import and why"
fi

log "GPU tests"
tests_rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_selective_scan.py tests/test_causal_conv1d.py \
  tests/test_numerics.py tests/test_kernel_call_sites.py -k "cuda or kernel" >"$out/pytest.log" 2>&1 ||
  tests_rc=$?
tail -3 "$out/pytest.log"
log "parity, training updates and speed"
checks_rc=0
"$PY" run_scripts/gpu_check.py "$out" >"$out/gpu_check.log" 2>&1 || checks_rc=$?
if [[ ! -s "$out/gpu_check.md" ]]; then
  { echo "gpu_check.py stopped (exit $checks_rc) before its report; the end of gpu_check.log:"
    tail -30 "$out/gpu_check.log"; } >"$out/gpu_check.md"
fi
echo "GPU tests exit status: $tests_rc (tests/... -k 'cuda or kernel', log: pytest.log)" >>"$out/gpu_check.md"
log "report: $out/gpu_check.md"
cat "$out/gpu_check.md"
exit $(( tests_rc || checks_rc ))
