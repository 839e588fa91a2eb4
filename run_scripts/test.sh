#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent) and run the test suite on CPU.
# Extra arguments go to pytest (e.g. `bash run_scripts/test.sh -k padding`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash run_scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure (the suite must run)" >&2
  exit 1
fi
exit $status
