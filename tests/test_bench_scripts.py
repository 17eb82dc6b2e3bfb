"""The benchmark scripts still run (tiny sizes, CPU): their figures are measured by hand, but
their code paths must not rot between measurements."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_gpu_train_dry_run_on_cpu():
    out = bench("bench/gpu_train.py", "--device", "cpu", "--config", "configs/gpt_tiny.yaml", "--precision", "fp32",
                "--micro-batch", "2", "--accumulation", "1", "--steps", "4", "--warmup", "2", "--seq", "64",
                "--variants", "eager")
    assert "RESULT gpu_train_gpt_tiny_eager tokens_per_s=" in out


def test_checkpoint_bench_small():
    out = bench("bench/checkpoint.py", "--hidden", "128", "--layers", "1", "--vocab", "1000", "--repeats", "1",
                "--steps", "8")
    for name in ("checkpoint_save", "checkpoint_load", "checkpoint_async_stall"):
        assert f"RESULT {name} " in out
