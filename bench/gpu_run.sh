#!/usr/bin/env bash
# The GPU session's one command: every measurement of bench/gpu_run.py in one process, rows written to OUTDIR as
# they are measured. Needs only python3 with torch and triton (no make, no pip). Options after OUTDIR go to
# `python -m bench.gpu_run` (e.g. --budget 300, --sections headline sweep); see its --help.
#     bash bench/gpu_run.sh OUTDIR [options]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_run.sh OUTDIR [options of python -m bench.gpu_run]" >&2
    exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -u -m bench.gpu_run --out "$out" "$@"
