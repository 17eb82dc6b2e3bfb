"""Fused kernels vs their PyTorch references: forward + backward time per kernel.

For each kernel in pretrain/models/kernels, times one forward and one backward pass
(torch.autograd.grad with a fixed random output gradient) of
  (a) the PyTorch reference in eager mode (pretrain/models/kernels/reference.py),
  (b) torch.compile of that reference,
  (c) the Triton kernel, on CUDA only: on CPU Triton runs only under TRITON_INTERPRET=1, an
      interpreter with no speed meaning, so it is not timed there.
CUDA times are triton.testing.do_bench medians (device events); CPU times the median of a
perf_counter loop after warm-up. Every input is random (never zeros).

    python bench/kernels.py                    # CPU: smaller sizes, fp32, (a) vs (b)
    python bench/kernels.py --device cuda      # 1.3B-model sizes, bf16, (a), (b) and (c)

Sizes on CUDA are one 1.3B-model micro-batch: 8192 tokens (2 x 4096), hidden 2048, SwiGLU
fc1 output 2 x 5461, 16 heads of 128 for RoPE, a 50304-column vocabulary shard for the loss.
The `GB/s` column is the least traffic a fused forward + backward must move (each input read
once, each output written once; listed per kernel below) over the time of the fastest variant.

Ends with one line per kernel: `RESULT kernels_<name> eager_ms=... compiled_ms=... triton_ms=...
ratio=<eager time / best of compiled and Triton>` (ratio > 1: ours is faster than eager).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.models.gpt import rope_tables
from pretrain.models.kernels import reference

SIZES = {
    # tokens, hidden, ffn (per half of fc1's output), heads, head_dim, vocab shard
    "cuda": dict(batch=2, seq=4096, hidden=2048, ffn=5461, heads=16, head_dim=128, vocab=50304),
    "cpu": dict(batch=1, seq=1024, hidden=1024, ffn=2731, heads=8, head_dim=64, vocab=8192),
}


@dataclass
class Case:
    name: str
    shape: str
    inputs: list  # tensors; those with requires_grad get gradients
    grad_out: object  # tensor or tuple of tensors matching the outputs
    reference: Callable
    triton: Callable
    min_bytes: int  # least bytes a fused forward + backward moves


def make_cases(device: str, dtype: torch.dtype) -> list[Case]:
    s = SIZES[device]
    tokens, h, f = s["batch"] * s["seq"], s["hidden"], s["ffn"]
    elt = torch.finfo(dtype).bits // 8

    def rand(*shape, grad=True, scale=1.0):
        t = (scale * torch.randn(*shape, device=device)).to(dtype)
        return t.requires_grad_(grad)

    from pretrain.models import kernels  # public API: Triton on CUDA when triton imports

    cases = []
    x, w, b = rand(tokens, h), rand(h, scale=0.5), rand(h)
    with torch.no_grad():
        w += 1
    cases.append(
        Case(
            "rms_norm",
            f"[{tokens}, {h}]",
            [x, w],
            rand(tokens, h, grad=False),
            lambda x, w: reference.rms_norm(x, w, 1e-5),
            lambda x, w: kernels.rms_norm(x, w, 1e-5),
            5 * tokens * h * elt,
        )
    )
    cases.append(
        Case(
            "layer_norm",
            f"[{tokens}, {h}]",
            [x, w, b],
            rand(tokens, h, grad=False),
            lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
            lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
            5 * tokens * h * elt,
        )
    )
    hh = rand(tokens, 2 * f, scale=2.0)
    cases.append(
        Case(
            "swiglu",
            f"[{tokens}, 2x{f}]",
            [hh],
            rand(tokens, f, grad=False),
            reference.swiglu,
            kernels.swiglu,
            8 * tokens * f * elt,
        )
    )
    bq, heads, seq, d = s["batch"], s["heads"], s["seq"], s["head_dim"]
    cos, sin = (t.to(device=device, dtype=dtype) for t in rope_tables(positions=seq, head_dim=d, theta=10000.0))
    q, k = rand(bq, heads, seq, d), rand(bq, heads, seq, d)
    cases.append(
        Case(
            "rope",
            f"q,k [{bq}, {heads}, {seq}, {d}]",
            [q, k],
            (rand(bq, heads, seq, d, grad=False), rand(bq, heads, seq, d, grad=False)),
            lambda q, k: reference.apply_rope(q, k, cos, sin),
            lambda q, k: kernels.apply_rope(q, k, cos, sin),
            2 * 4 * q.numel() * elt,
        )
    )
    v = s["vocab"]
    logits = rand(tokens, v, scale=3.0)
    labels = torch.randint(0, v - 7, (tokens,), device=device)
    labels[::13] = -100
    cases.append(
        Case(
            "cross_entropy",
            f"[{tokens}, {v}] (7 padding)",
            [logits],
            torch.rand(tokens, device=device) + 0.5,
            lambda x: reference.cross_entropy(x, labels, vocab_size=v - 7),
            lambda x: kernels.cross_entropy(x, labels, vocab_size=v - 7),
            3 * tokens * v * elt,
        )
    )
    return cases


def fwd_bwd(fn: Callable, inputs: list, grad_out) -> Callable[[], None]:
    wrt = [t for t in inputs if t.requires_grad]
    grads = list(grad_out) if isinstance(grad_out, tuple) else [grad_out]

    def step():
        out = fn(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.grad(outs, wrt, grads)

    return step


def time_ms(step: Callable[[], None], device: str, *, min_reps: int = 10, budget_s: float = 2.0) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median"))
    for _ in range(2):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_case(case: Case, device: str) -> dict:
    row = {"name": case.name, "shape": case.shape, "min_bytes": case.min_bytes}
    row["eager"] = time_ms(fwd_bwd(case.reference, case.inputs, case.grad_out), device)
    try:
        compiled = torch.compile(case.reference)
        row["compiled"] = time_ms(fwd_bwd(compiled, case.inputs, case.grad_out), device)
    except Exception as e:  # report and go on: one kernel's compile failure is a finding, not a crash
        row["compiled"] = None
        row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["triton"] = time_ms(fwd_bwd(case.triton, case.inputs, case.grad_out), device) if device == "cuda" else None
    return row


def fmt(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--only", nargs="*", help="kernel names to run (default: all)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    rows = []
    for case in make_cases(args.device, dtype):
        if args.only and case.name not in args.only:
            continue
        rows.append(bench_case(case, args.device))
        print(f"  {case.name}: done", file=sys.stderr, flush=True)

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nforward + backward, {dtype_name}, {dev}, torch {torch.__version__}; median ms")
    if args.device != "cuda":
        print("Triton not timed: on CPU it runs only under TRITON_INTERPRET=1, which has no speed meaning")
    print("| kernel | shape | eager ms | compiled ms | triton ms | best GB/s (min bytes) | ratio eager/best |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for r in rows:
        ours = [t for t in (r["compiled"], r["triton"]) if t is not None]
        best = min(ours) if ours else None
        ratio = r["eager"] / best if best else float("nan")
        fastest = min([r["eager"], *ours])
        gbps = r["min_bytes"] / (fastest * 1e-3) / 1e9
        print(
            f"| {r['name']} | {r['shape']} | {fmt(r['eager'])} | {fmt(r['compiled'])} | {fmt(r['triton'])} | "
            f"{gbps:.1f} ({r['min_bytes'] / 1e6:.0f} MB) | {ratio:.2f} |"
        )
        if "compile_error" in r:
            print(f"  torch.compile failed for {r['name']}: {r['compile_error']}")
        results.append(
            f"RESULT kernels_{r['name']} eager_ms={r['eager']:.4f} compiled_ms={fmt(r['compiled'])} "
            f"triton_ms={fmt(r['triton'])} device={args.device} dtype={dtype_name} ratio={ratio:.3f}"
        )
    print("\n" + "\n".join(results))


if __name__ == "__main__":
    main()
