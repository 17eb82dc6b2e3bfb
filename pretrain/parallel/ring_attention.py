"""Ring attention across the context-parallel ranks (parallel.context_attention=ring).

Each CP rank holds its queries and one K/V block (its own tokens, pretrain/parallel/context.py).
The K/V blocks travel round the ring, rank i -> i + 1: at step t rank i holds the block of rank
i - t. Each step posts the transfer of the block it holds to the next rank before computing
attention on it, so the transfer overlaps the compute; after CP steps every rank has seen every
block. A block's attention is partial (softmax over its keys only): its output and its
log-sum-exp per query row are merged into the running result by log-sum-exp, which gives
exactly softmax over all keys.

Backward (exact, no approximation): with the final output O and log-sum-exp L of each row, a
block's probabilities are P = exp(S - L), so every block's gradients follow from O, L and the
incoming dO alone (FlashAttention's backward): dV = P^T dO, dS = P (dO V^T - rowsum(dO O)),
dQ = dS K, dK = dS^T Q. The K/V blocks go round the ring again; each block's dK/dV accumulator
travels with it, picking up every rank's contribution, and one last hop brings it home.

Transfers follow NCCL's rules (pretrain/parallel/nccl_rules.py; tests/test_nccl_rules.py runs
the ring under the checker): every transfer is one `batch_isend_irecv` group of a send to the
next rank and a receive from the previous one, posted in the same order on every rank, and
waited for before its buffer is read.

Load balancing decides which parts of a block can matter: with the causal mask, a block from an
earlier rank is seen whole by this rank's queries but only through its first chunk, and a block
from a later rank only by this rank's second chunk (`RingBlock`); the rest is never computed.

Block kernels (pretrain/parallel/ring_kernels.py, picked once per device, dtype and
model.attention_backend): each block's attention comes from a kernel that returns its
log-sum-exp, and each block's backward takes the final out and lse (FlashAttention's own
contract). On CPU that is torch's fused flash kernel (fp32, bf16); on CUDA torch's flash and
memory-efficient kernels, or flash-attn's under model.attention_backend=flash_attn; a math
kernel (scores per tile of query rows, fp32) is the reference, runs float64, and is the fallback.
A block is full, causal (the rank's own, without documents: the kernels' is_causal) or masked
(documents); a row that sees no key of a masked block merges as lse -inf, out 0. The merge and
the accumulated gradients stay in fp32 whatever the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.parallel.ring_kernels import Block, BlockKernel, finite_lse, widen
from pretrain.parallel.waits import waiting


def visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """bool [b | 1, 1, sq, sk]: True where a query at global position q_pos may attend to a key at
    k_pos (causal: the key is not later; documents q_seg [b, sq], k_seg [b, sk]: the same
    document number). None: every query may see every key."""
    mask = None
    if causal:
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if q_seg is not None:
        same = (q_seg[:, :, None] == k_seg[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


@dataclass(frozen=True)
class RingBlock:
    """What one source rank's K/V block contributes to this rank's queries: the query rows and
    key columns that can see each other at all (the rest is skipped), and which of them see which
    (`kind`: full, causal or masked; pretrain/parallel/ring_kernels.py)."""

    rows: slice
    cols: slice
    kind: Block

    @staticmethod
    def between(
        *,
        q_chunks: tuple[int, int],
        k_chunks: tuple[int, int],
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        causal: bool,
        q_seg: torch.Tensor | None,
        k_seg: torch.Tensor | None,
    ) -> RingBlock | None:
        """The block of keys at chunks `k_chunks` (global positions k_pos) for queries at chunks
        `q_chunks` (q_pos); None when no query sees any of its keys."""

        def sees(a: int, b: int) -> bool:  # query chunk a, key chunk b
            return not causal or k_chunks[b] <= q_chunks[a]

        rows = [a for a in (0, 1) if any(sees(a, b) for b in (0, 1))]
        cols = [b for b in (0, 1) if any(sees(a, b) for a in rows)]
        if not rows:
            return None
        c = q_pos.shape[0] // 2
        row, col = slice(rows[0] * c, (rows[-1] + 1) * c), slice(cols[0] * c, (cols[-1] + 1) * c)
        partial = causal and any(not sees(a, b) or k_chunks[b] == q_chunks[a] for a in rows for b in cols)
        if q_seg is None and (not partial or q_chunks == k_chunks):
            # Without documents a block is full, or the rank's own (its local order is the global
            # order, so the mask is the square causal one): the fused kernels' is_causal.
            return RingBlock(row, col, Block(causal=partial))
        mask = visible(
            q_pos[row],
            k_pos[col],
            causal=partial,
            q_seg=None if q_seg is None else q_seg[:, row],
            k_seg=None if k_seg is None else k_seg[:, col],
        )
        return RingBlock(row, col, Block(mask=mask))


class RingLink:
    """One step of the ring: send a tensor to the next CP rank while receiving its like from the
    previous one, as one NCCL-safe batched group."""

    def __init__(self, *, group, next_rank: int, prev_rank: int) -> None:
        self.group, self.next_rank, self.prev_rank = group, next_rank, prev_rank

    def start(self, t: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Post the exchange; returns what `finish` needs. `t` must not change until then."""
        buffer = torch.empty_like(t)
        ops = [
            dist.P2POp(dist.isend, t, self.next_rank, self.group),
            dist.P2POp(dist.irecv, buffer, self.prev_rank, self.group),
        ]
        return dist.batch_isend_irecv(ops), buffer

    @staticmethod
    def finish(pending: tuple[list, torch.Tensor]) -> torch.Tensor:
        works, buffer = pending
        with waiting():
            for work in works:
                work.wait()
        return buffer


# -- the ring ------------------------------------------------------------------------------------


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor, rows: slice) -> None:
    """Fold a block's (out, lse) over `rows` into the running result (fp32 or wider), in place."""
    old_out, old_lse = out[:, :, rows], lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, part_lse)
    keep = torch.exp(old_lse - finite_lse(new_lse)).unsqueeze(-1)
    take = torch.exp(part_lse - finite_lse(new_lse)).unsqueeze(-1)
    out[:, :, rows] = old_out * keep + part * take
    lse[:, :, rows] = new_lse


def _ring_forward(q, k, v, *, blocks, link: RingLink, rank: int, size: int, kernel: BlockKernel):
    b, heads, s, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros((b, heads, s, d), dtype=acc, device=q.device)
    lse = torch.full((b, heads, s), float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])  # [2, b, kv_heads, s, d]: one message per step
    for step in range(size):
        pending = link.start(kv) if step < size - 1 else None  # the next block, while we compute
        block = blocks[(rank - step) % size]
        if block is not None:
            r, c = block.rows, block.cols
            part, part_lse = kernel.forward(q[:, :, r], kv[0][:, :, c], kv[1][:, :, c], block.kind)
            _merge(out, lse, part.to(acc), part_lse.to(acc), r)
        if pending is not None:
            kv = link.finish(pending)
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, *, blocks, link: RingLink, rank: int, size: int, kernel: BlockKernel):
    delta = (widen(dout) * widen(out)).sum(-1)  # [b, heads, s]
    acc = delta.dtype
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # the held block's sum so far
    arriving = None  # the accumulator of the block held next, in flight from the previous rank
    for step in range(size):
        pending = link.start(kv) if step < size - 1 else None
        block = blocks[(rank - step) % size]
        grads = None
        if block is not None:
            r, c = block.rows, block.cols
            dq_b, dk_b, dv_b = kernel.backward(
                dout[:, :, r], q[:, :, r], kv[0][:, :, c], kv[1][:, :, c], out[:, :, r], lse[:, :, r],
                delta[:, :, r], block.kind,
            )  # fmt: skip
            dq[:, :, r] += dq_b
            grads = (c, dk_b, dv_b)
        if arriving is not None:  # it travelled while this step computed
            dkv = link.finish(arriving)
        if grads is not None:
            c, dk_b, dv_b = grads
            dkv[0][:, :, c] += dk_b
            dkv[1][:, :, c] += dv_b
        arriving = link.start(dkv)  # on with the block's sum; after the last step, home
        if pending is not None:
            kv = link.finish(pending)
    dkv = link.finish(arriving)  # this rank's own block, summed over every rank's queries
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks, link, rank, size, kernel):
        ring = dict(blocks=blocks, link=link, rank=rank, size=size, kernel=kernel)
        # The blocks compute in their own dtypes (math: fp32; fused: the inputs', lse in fp32), and
        # the merge in fp32: not in whatever an enclosing bf16 autocast would pick for matmuls.
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, **ring)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, **ctx.ring)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, *, blocks, link: RingLink, rank: int, size: int, kernel: BlockKernel) -> torch.Tensor:
    """q [b, heads, s_local, d], k, v [b, kv_heads, s_local, d] -> [b, heads, s_local, d]: this
    rank's queries over every CP rank's keys; `blocks[r]`: what rank r's block contributes,
    computed by `kernel` (pretrain/parallel/ring_kernels.py's choose_kernel)."""
    return _RingAttention.apply(q, k, v, blocks, link, rank, size, kernel)
