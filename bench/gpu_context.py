"""Context parallelism's kernel path on one device: the ring's blocks, each through a block kernel
that returns its log-sum-exp, merged by log-sum-exp, equal attention over the whole sequence
(bench/gpu.sh runs it on a lent GPU; without one it runs the CPU kernels).

    python bench/gpu_context.py [--device cuda|cpu] [--seq 8192] [--cp 4] [--speed]

The CP ranks are played one after another on this device: rank r's queries (chunks r and
2 CP - 1 - r) go over every rank's K/V block as the ring computes them (`RingBlock`: full, the
causal own block, or masked by documents), through each block kernel available here
(pretrain/parallel/ring_kernels.py: `math` and `cpu_flash` on CPU; `math`, `cuda_sdpa` and, when
installed, `flash_attn` on CUDA), merged by the ring's own `_merge`; the backward takes each
block's share from the final out and log-sum-exp. Checked against SDPA over the whole sequence
(grouped-query attention, causal, with and without documents; fp32, and bf16 for the fused
kernels), forward and backward. `--speed`: one own (causal) block and one full block of
`--local` tokens, fused kernel against math, forward + backward.
Prints `RESULT context_kernel_... max_abs_err=... ok=...` lines.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.models.attention import document_mask
from pretrain.parallel.ring_attention import RingBlock, _merge
from pretrain.parallel.ring_kernels import Block, choose_kernel


def chunk_positions(seq: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions of CP rank `rank`'s tokens (pretrain/parallel/context.py's split)."""
    c = seq // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])


def ring_on_one_device(q, k, v, dout, *, cp: int, kernel, segments):
    """(out, dq, dk, dv) of the whole sequence, computed rank by rank as the ring does."""
    b, heads, seq, d = q.shape
    positions = [chunk_positions(seq, cp, r).to(q.device) for r in range(cp)]
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v))
    out_all = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for rank in range(cp):
        mine = positions[rank]
        blocks = [
            RingBlock.between(
                q_chunks=(rank, 2 * cp - 1 - rank),
                k_chunks=(src, 2 * cp - 1 - src),
                q_pos=mine,
                k_pos=positions[src],
                causal=True,
                q_seg=None if segments is None else segments[:, mine],
                k_seg=None if segments is None else segments[:, positions[src]],
            )
            for src in range(cp)
        ]
        ql, dl = q[:, :, mine], dout[:, :, mine]
        out = torch.zeros(ql.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(ql.shape[:3], float("-inf"), device=q.device)
        for src, block in enumerate(blocks):
            if block is not None:
                kb, vb = k[:, :, positions[src]][:, :, block.cols], v[:, :, positions[src]][:, :, block.cols]
                part, part_lse = kernel.forward(ql[:, :, block.rows], kb, vb, block.kind)
                _merge(out, lse, part.float(), part_lse.float(), block.rows)
        out = out.to(q.dtype)
        out_all[:, :, mine] = out
        delta = (dl.float() * out.float()).sum(-1)
        for src, block in enumerate(blocks):
            if block is not None:
                r, c = block.rows, block.cols
                kb, vb = k[:, :, positions[src]][:, :, c], v[:, :, positions[src]][:, :, c]
                gq, gk, gv = kernel.backward(
                    dl[:, :, r], ql[:, :, r], kb, vb, out[:, :, r], lse[:, :, r], delta[:, :, r], block.kind
                )
                dq[:, :, mine[r]] += gq.float()
                dk[:, :, positions[src][c]] += gk.float()
                dv[:, :, positions[src][c]] += gv.float()
    return out_all, dq, dk, dv


def kernels_here(device: str) -> list[str]:
    if device == "cpu":
        return ["math", "cpu_flash"]
    names = ["math", "cuda_sdpa"]
    return names + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])


def check(device: str, seq: int, cp: int, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> int:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, heads, seq, dim, device=device, generator=g)
    k, v = (torch.randn(2, kv_heads, seq, dim, device=device, generator=g) for _ in range(2))
    dout = torch.randn(2, heads, seq, dim, device=device, generator=g)
    ends = torch.zeros(2, seq, dtype=torch.long, device=device)  # documents across chunk borders
    ends[0, [seq // 7, seq // 3, seq // 2 + 5]] = 1
    ends[1, [seq // 5, seq - 3]] = 1
    failed = 0
    for documents in (False, True):
        segments = (ends.cumsum(1) - ends) if documents else None
        mask = None if segments is None else document_mask(segments, causal=True)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*full, is_causal=mask is None, attn_mask=mask, enable_gqa=True)
        ref.backward(dout)
        refs = [ref.detach()] + [t.grad for t in full]
        # bf16's own rounding: SDPA over the whole sequence in bf16 against the fp32 reference
        half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        ref_half = F.scaled_dot_product_attention(*half, is_causal=mask is None, attn_mask=mask, enable_gqa=True)
        ref_half.backward(dout.bfloat16())
        bf16_errs = [
            float((a.float() - r).abs().max()) for a, r in zip([ref_half.detach()] + [t.grad for t in half], refs)
        ]
        for name in kernels_here(device):
            for dtype in (torch.float32, torch.bfloat16):
                if name == "math" and dtype != torch.float32 or name == "flash_attn" and dtype == torch.float32:
                    continue
                try:
                    kernel = choose_kernel(name, device=torch.device(device), dtype=dtype)
                    got = ring_on_one_device(
                        *(t.to(dtype) for t in (q, k, v, dout)), cp=cp, kernel=kernel, segments=segments
                    )
                except Exception as exc:  # a kernel that cannot run here is a failed check
                    print(f"RESULT context_kernel_{name} device={device} ok=False error={type(exc).__name__}: {exc}")
                    failed += 1
                    continue
                errs = [float((a.float() - r.float()).abs().max()) for a, r in zip(got, refs)]
                # fp32: 1e-4; bf16: within twice what bf16 SDPA on one device is off by
                tols = [1e-4] * 4 if dtype == torch.float32 else [2 * e for e in bf16_errs]
                nan = any(bool(t.isnan().any()) for t in got)
                ok = all(e < t for e, t in zip(errs, tols)) and not nan
                failed += not ok
                print(
                    f"RESULT context_kernel_{name} device={device} {str(dtype).removeprefix('torch.')} "
                    f"{'documents' if documents else 'causal'} seq={seq} cp={cp} "
                    f"max_abs_err(out,dq,dk,dv)={','.join(f'{e:.1e}' for e in errs)} "
                    f"tol={','.join(f'{t:.1e}' for t in tols)} ok={ok}"
                )
    return failed


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(kernel, q, k, v, dout, block: Block) -> None:
    """One block through `kernel`, forward then backward (from its own out and lse)."""
    out, lse = kernel.forward(q, k, v, block)
    out = out.to(q.dtype)
    delta = (dout.float() * out.float()).sum(-1)
    kernel.backward(dout, q, k, v, out, lse.float(), delta, block)


def speed(device: str, local: int, reps: int, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> None:
    """Fused kernel against math on the ring's two block shapes, forward + backward, best of reps."""
    fused = "cpu_flash" if device == "cpu" else "cuda_sdpa"
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(0)
        q, dout = (torch.randn(1, heads, local, dim, device=device, generator=g, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(1, kv_heads, local, dim, device=device, generator=g, dtype=dtype) for _ in range(2))
        # own block: local x local, causal; full block (an earlier rank's, seen by both chunks): local x local / 2
        for shape, block, cols in (("causal", Block(causal=True), local), ("full", Block(), local // 2)):
            times = {}
            for name in ("math", fused):
                kernel = choose_kernel(name, device=torch.device(device), dtype=dtype)
                step = functools.partial(forward_backward, kernel, q, k[:, :, :cols], v[:, :, :cols], dout, block)
                times[name] = timed(step, reps)
            print(
                f"RESULT context_kernel_speed device={device} {str(dtype).removeprefix('torch.')} {shape} "
                f"rows={local} cols={cols} heads={heads}/{kv_heads} d={dim} math={times['math']:.3f}s "
                f"{fused}={times[fused]:.3f}s speedup={times['math'] / times[fused]:.2f}x"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=None, help="default: 8192 on CUDA, 512 on CPU")
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--speed", action="store_true", help="also time fused against math per block")
    p.add_argument("--local", type=int, default=4096, help="--speed: a rank's tokens")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    seq = args.seq or (8192 if args.device == "cuda" else 512)
    if seq % (2 * args.cp):
        p.error("--seq must be a multiple of 2 x --cp")
    failed = check(args.device, seq, args.cp)
    if args.speed:
        speed(args.device, args.local, args.reps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
