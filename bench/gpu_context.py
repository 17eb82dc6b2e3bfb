"""Context parallelism's kernel path on one device: attention over key blocks merged by
log-sum-exp equals attention over the whole sequence (bench/gpu.sh runs it on the lent GPU).

    python bench/gpu_context.py [--device cuda] [--seq 4096] [--blocks 4]

The ring (pretrain/parallel/ring_attention.py) computes each rank's attention one key block at
a time and merges the partial results by their log-sum-exp; its backward takes each block's
share from the final log-sum-exp. Two ranks on one GPU are not needed to check that: here the
blocks of one causal sequence go through the ring's own `block_forward` / `_merge` /
`block_backward` on the device, against SDPA over the whole sequence, forward and backward.
On CUDA the same merge is also fed by the flash kernel's own log-sum-exp
(`aten._scaled_dot_product_flash_attention`, bf16), the output a GPU ring would merge.
Prints `RESULT context_kernel_... max_abs_err=... ok=...` lines.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.parallel.ring_attention import _merge, block_backward, block_forward


def causal_mask(rows: slice, cols: slice, device) -> torch.Tensor:
    q = torch.arange(rows.start, rows.stop, device=device)
    k = torch.arange(cols.start, cols.stop, device=device)
    return (k[None, :] <= q[:, None])[None, None]  # [1, 1, sq, sk]: broadcast over batch, kv heads


def merged_attention(q, k, v, blocks: int, partial) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of causal attention over `blocks` key blocks, each from `partial(q, k, v, cols)`."""
    b, heads, s, d = q.shape
    out = torch.zeros(b, heads, s, d, device=q.device)
    lse = torch.full((b, heads, s), float("-inf"), device=q.device)
    step = s // blocks
    for j in range(blocks):
        cols = slice(j * step, (j + 1) * step)
        part, part_lse = partial(q, k, v, cols)
        _merge(out, lse, part, part_lse, slice(0, s))
    return out, lse


def ours(q, k, v, cols):
    return block_forward(q, k[:, :, cols], v[:, :, cols], causal_mask(slice(0, q.shape[2]), cols, q.device))


def flash(q, k, v, cols):
    """The flash kernel over one key block. Keys are a causal block only where they lie on the
    diagonal; rows before the block see none of it (lse -inf), rows after see all of it."""
    s = q.shape[2]
    out = torch.zeros(q.shape, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    rows = slice(cols.start, s)
    full_out, full_lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q[:, :, rows], k[:, :, cols], v[:, :, cols], 0.0, False
    )[:2]
    diag_out, diag_lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q[:, :, cols], k[:, :, cols], v[:, :, cols], 0.0, True
    )[:2]
    out[:, :, rows], lse[:, :, rows] = full_out.float(), full_lse.float()
    out[:, :, cols], lse[:, :, cols] = diag_out.float(), diag_lse.float()
    return out, lse


def check(device: str, seq: int, blocks: int, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> int:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, heads, seq, dim, device=device, generator=g)
    k, v = (torch.randn(2, kv_heads, seq, dim, device=device, generator=g) for _ in range(2))
    dout = torch.randn(2, heads, seq, dim, device=device, generator=g)
    q_ref, k_ref, v_ref = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q_ref, k_ref, v_ref, is_causal=True, enable_gqa=True)
    ref.backward(dout)

    out, lse = merged_attention(q, k, v, blocks, ours)
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    step = seq // blocks
    for j in range(blocks):
        cols = slice(j * step, (j + 1) * step)
        mask = causal_mask(slice(0, seq), cols, q.device)
        bq, bk, bv = block_backward(dout, q, k[:, :, cols], v[:, :, cols], lse, delta, mask)
        dq += bq
        dk[:, :, cols] += bk
        dv[:, :, cols] += bv
    errors = {
        "out": (out - ref.detach()).abs().max(),
        "dq": (dq - q_ref.grad).abs().max(),
        "dk": (dk - k_ref.grad).abs().max(),
        "dv": (dv - v_ref.grad).abs().max(),
    }
    failed = 0
    for name, err in errors.items():
        ok = float(err) < 1e-4
        failed += not ok
        print(
            f"RESULT context_kernel_{name} device={device} seq={seq} blocks={blocks} "
            f"max_abs_err={float(err):.2e} ok={ok}"
        )
    if device == "cuda":
        failed += check_flash(q, k, v, blocks, ref)
    return failed


def check_flash(q, k, v, blocks: int, ref: torch.Tensor) -> int:
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))  # the flash op has no GQA
    try:
        out, _ = merged_attention(*(t.bfloat16() for t in (q, k, v)), blocks, flash)
    except (RuntimeError, AttributeError) as exc:
        print(f"RESULT context_kernel_flash_lse ok=False unavailable: {exc}")
        return 1
    err = float((out - ref.float()).abs().max())
    ok = err < 3e-2  # bf16 inputs
    print(f"RESULT context_kernel_flash_lse bf16 blocks={blocks} max_abs_err={err:.2e} ok={ok}")
    return not ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=4)
    args = p.parse_args()
    if args.seq % args.blocks:
        p.error("--seq must divide by --blocks")
    return 1 if check(args.device, args.seq, args.blocks) else 0


if __name__ == "__main__":
    sys.exit(main())
