#!/usr/bin/env bash
# Install what the tests need (CPU torch pinned by constraints.txt) and run the whole suite.
# This is the README's test command; .ci/run calls it on a fresh clone.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT"
"$PY" -m pip install -q -c constraints.txt -e ".[test]"
exec "$PY" -m pytest -q tests "$@"
