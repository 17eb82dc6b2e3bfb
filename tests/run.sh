#!/usr/bin/env bash
# Install what the tests need (CPU torch pinned by constraints.txt) and run the whole suite.
# This is the README's test command; .ci/run calls it on a fresh clone.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT"
# DeepSpeed (ZeRO tests) installs without prebuilt C++ ops (DS_BUILD_OPS=0); its first start
# compiles a small communication op with g++ and ninja (ninja comes from PyPI with it). The
# compiled op lands in TORCH_EXTENSIONS_DIR, a cache it rebuilds whenever it is missing.
if ! command -v g++ >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq g++
    else
        echo "tests/run.sh: g++ is missing and apt-get is not available; DeepSpeed needs a C++ compiler" >&2
        exit 1
    fi
fi
DS_BUILD_OPS=0 "$PY" -m pip install -q -c constraints.txt -e ".[test]"
# torch finds ninja on PATH; pip puts it beside this Python, which may not be on PATH yet.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
exec "$PY" -m pytest -q tests "$@"
