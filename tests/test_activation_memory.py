"""bench/activation_memory.py runs (tiny sizes) and measures the per-layer activation bytes the
13B script's memory header uses: with sequence parallelism the QKV and fc1 inputs are saved
all-gathered, so k = 28 + 4 t (32 at TP 1, 36 at TP 2; 44 at the 13B script's TP 4)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_activation_memory_bench_measures_28_plus_4t():
    result = subprocess.run(
        [
            sys.executable,
            "bench/activation_memory.py",
            "--tp",
            "1",
            "2",
            "--hidden",
            "64",
            "--heads",
            "4",
            "--seq",
            "32",
            "--layers",
            "2",
            "--vocab",
            "200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("RESULT activation_memory bytes_per_layer_coef=")
    coef = {int(t): float(k) for t, k in re.findall(r"coef_tp(\d+)=([\d.]+)", line)}
    # + 8 bytes per token of LayerNorm statistics: 8 / (h / t) per sequence-parallel token share
    assert abs(coef[1] - 32 - 8 / 64) < 0.01 and abs(coef[2] - 36 - 8 / 64) < 0.01, line
