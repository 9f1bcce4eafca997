#!/usr/bin/env bash
# The GPU check for the `device` tool, in one call of under 8 minutes (see docs/PERFORMANCE.md):
# install the carried wheels (hydra-core, omegaconf, antlr4: the device image lacks them), decode
# the carried JPEG CIFAR-10, benchmark the 12 networks (Lightning path vs plain loop), train
# All-CNN-C with the paper's recipe for the longest schedule that fits, print a short table last.
#
#   bash scripts/device_check.sh             # on the device: reads .carry/cifar10-jpeg.npz, .whl/*.whl
#   bash scripts/device_check.sh --dry-run   # the same path on this CPU with tiny settings
#
# Results go to $OUT (set by the device tool; default outputs/device_check). Extra arguments go to
# scripts/device_check.py (--jpeg, --budget-s, ...). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device_check}
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  SITE=${SITE:-/tmp/site}
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/device_check.py --out "$OUT" "$@"
