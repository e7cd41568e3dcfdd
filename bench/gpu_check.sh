#!/usr/bin/env bash
# The prepared GPU check (issue 16): one table, under 8 minutes on one H100/H200.
#   bench/gpu_check.sh                        # CUDA
#   bench/gpu_check.sh --device cpu --quick   # CI-sized run of every code path
# Extra arguments go to bench/gpu_check.py. PYTHON overrides the interpreter (default: the
# repository's .venv if present, else python3). Paste the table into docs/benchmarks.md with the device.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# hard stop below 8 minutes whatever happens (the script keeps its own budget of 7)
exec timeout --signal=INT 470 "$PYTHON" "$here/gpu_check.py" "$@"
