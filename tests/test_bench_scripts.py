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
    out = bench(
        "bench/gpu_train.py",
        "--device",
        "cpu",
        "--config",
        "configs/gpt_tiny.yaml",
        "--precision",
        "fp32",
        "--micro-batch",
        "2",
        "--accumulation",
        "1",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--seq",
        "64",
        "--variants",
        "eager",
    )
    assert "RESULT gpu_train_gpt_tiny_eager tokens_per_s=" in out


def test_context_kernel_check_on_cpu():
    """bench/gpu.sh's context-parallel check, on the CPU: the ring's math kernel (fp32) and torch's
    fused CPU kernel (fp32, bf16), causal and with documents; and the per-block timing."""
    out = bench(
        "bench/gpu_context.py",
        "--device",
        "cpu",
        "--seq",
        "256",
        "--cp",
        "4",
        "--speed",
        "--local",
        "64",
        "--reps",
        "1",
    )
    assert out.count("ok=True") == 6 and "ok=False" not in out
    assert out.count("RESULT context_kernel_speed device=cpu") == 4


def test_checkpoint_bench_small():
    out = bench(
        "bench/checkpoint.py", "--hidden", "128", "--layers", "1", "--vocab", "1000", "--repeats", "1", "--steps", "8"
    )
    for name in ("checkpoint_save", "checkpoint_load", "checkpoint_async_stall"):
        assert f"RESULT {name} " in out


def test_zero_comm_bench_small():
    """ZeRO-1 with TP2 + SP at DP2: the gradient reduction runs during the last backward (only
    the last bucket after it), and the SP gradients are summed in one TP all-reduce per step."""
    out = bench(
        "bench/zero_comm.py",
        "--layouts",
        "tp2_sp_dp2",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--vocab",
        "500",
        "--seq",
        "32",
        "--bucket-mb",
        "0.05",
        "--steps",
        "1",
    )
    fields = dict(f.split("=") for f in out.split("RESULT zero_comm ", 1)[1].split())
    assert float(fields["tp2_sp_dp2_after_share"]) < 0.5
    assert fields["tp2_sp_dp2_tp_allreduce_backward"] == "1"


def test_planner_calibration_prints_every_published_row():
    out = bench("bench/planner_calibration.py")
    rows = [line for line in out.splitlines() if line.startswith("RESULT planner_calibration_")]
    assert len(rows) == 4
    for row in rows:
        ratio = float(row.rsplit("ratio=", 1)[1])
        assert 0.5 < ratio < 2, row  # the model is calibrated; a regression shows as a far-off ratio


def test_parallel_bench_pipeline_schedules_small():
    """bench/parallel.py's PP=2 schedule rows (1F1B, interleaved, ZB-H1, ZB-V), the replay of
    their steps on dedicated cores and their activation memory, at a tiny size."""
    out = bench(
        "bench/parallel.py",
        *("--layouts", "pp2_1f1b", "pp2_vp2", "pp2_zb_h1", "pp2_zb_v", "--cp-memory-seq", "0"),
        *("--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "500", "--seq", "64"),
        *("--warmup", "1", "--steps", "1", "--repeat", "1"),
    )
    for name in ("parallel_pp2_zb_h1", "parallel_pp2_zb_v", "parallel_pp2_bubble", "parallel_pp2_bubble_replayed"):
        assert f"RESULT {name} " in out
    assert "RESULT parallel_pp2_activations peak_mb_1f1b=" in out
