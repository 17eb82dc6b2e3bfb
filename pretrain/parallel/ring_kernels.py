"""The ring's block kernels: softmax attention of a rank's queries over one K/V block, returning
its log-sum-exp, and the block's share of the gradients from the final output and log-sum-exp.

A block (`Block`) is one of three kinds: full (every query row sees every key), causal (the
rank's own block without documents: square, query i sees keys 0..i), or masked (documents: a
boolean mask, which may leave a row with no key at all; such a row must come out with lse -inf
and out 0, so that the log-sum-exp merge ignores it).

Kernels (`choose_kernel`; parallel/ring_attention.py calls `forward` / `backward` per block):
- `math`: scores materialised per tile of query rows, in fp32 (or float64); runs anywhere, takes
  every block, and is the reference (the float64 tests run it).
- `cpu_flash`: torch's fused CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`
  and its `_backward`): returns the log-sum-exp, takes GQA and an additive mask of the query's
  dtype, and its backward takes the final out and lse. A row that sees no key comes back with
  out 0 but lse 0 (observed, torch 2.13), fixed up to -inf here.
- `cuda_sdpa`: torch's CUDA kernels. Full and causal blocks in fp16/bf16 go to the flash kernel
  (`aten._scaled_dot_product_flash_attention`, which takes no mask); masked blocks, and fp32, to
  the memory-efficient kernel (`aten._scaled_dot_product_efficient_attention`, additive
  attn_bias). K/V are expanded to the query heads for both (their GQA support is not part of
  these ops' contract), and the gradients summed back over each group.
- `flash_attn`: the flash-attn package's `_flash_attn_forward` / `_flash_attn_backward` (2.7+
  signature; GQA native, [b, s, heads, d] layout) for full and causal blocks; masked blocks
  (documents) go to `cuda_sdpa`'s memory-efficient kernel (flash-attn's varlen kernels could take
  them as per-document sequences; not written: untestable here).
The CUDA kernels are written from the ops' schemas and cannot run on this project's CPU
machines; bench/gpu_context.py checks them against `math` on a lent GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

KERNELS = ("auto", "math", "cpu_flash", "cuda_sdpa", "flash_attn")


@dataclass(frozen=True)
class Block:
    """Which query rows see which keys of one block: `mask` bool [b | 1, 1, rows, cols] (masked),
    or `causal` (square: query i sees keys 0..i), or neither (full)."""

    causal: bool = False
    mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def mask_rows(self, start: int, stop: int, cols: int, device) -> torch.Tensor | None:
        """bool mask of query rows start..stop (block-relative) over the block's keys."""
        if self.mask is not None:
            return self.mask[:, :, start:stop]
        if self.causal:
            rows = torch.arange(start, stop, device=device)
            return (torch.arange(cols, device=device)[None, :] <= rows[:, None])[None, None]
        return None

    def bias(self, dtype: torch.dtype, *, align: int = 1) -> torch.Tensor:
        """`mask` as an additive mask (0 / -inf) in `dtype`, made once per forward; `align`: its
        last dimension's storage padded to a multiple (CUDA's memory-efficient kernel needs 16)."""
        key = (dtype, align)
        if key not in self._cache:
            *lead, cols = self.mask.shape
            padded = torch.zeros(*lead, -(-cols // align) * align, dtype=dtype, device=self.mask.device)
            bias = padded[..., :cols]
            self._cache[key] = bias.masked_fill_(~self.mask, float("-inf"))
        return self._cache[key]

    def seen(self) -> torch.Tensor:
        """bool [b | 1, 1, rows]: the query rows that see at least one key (masked blocks)."""
        if "seen" not in self._cache:
            self._cache["seen"] = self.mask.any(-1)
        return self._cache["seen"]


class BlockKernel(Protocol):
    name: str

    def forward(self, q, k, v, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """q [b, heads, rows, d], k, v [b, kv_heads, cols, d] -> (out [b, heads, rows, d] in
        q's dtype or wider, lse fp32 or wider [b, heads, rows]; -inf where a row sees no key)."""

    def backward(self, dout, q, k, v, out, lse, delta, block: Block):
        """The block's share of the gradients from the whole attention's final `out` (q's dtype),
        `lse` and delta = rowsum(dout * out) [b, heads, rows] -> (dq, dk, dv)."""


def widen(t: torch.Tensor) -> torch.Tensor:
    """t in the dtype the math kernel computes in: fp32, or the input's own when wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """A row that sees no key has lse -inf: subtracting 0 instead makes its probabilities 0."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _no_key_rows(out: torch.Tensor, lse: torch.Tensor, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a masked block that see no key: out 0 and lse -inf, whatever the kernel wrote."""
    if block.mask is None:
        return out, lse
    seen = block.seen()  # [b | 1, 1, rows]
    return out.masked_fill(~seen.unsqueeze(-1), 0.0), lse.masked_fill(~seen, float("-inf"))


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """K or V [b, kv_heads, s, d] -> [b, heads, s, d]: query head h reads kv head h // group."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of an expanded K or V -> [b, kv_heads, s, d], summed over each group."""
    b, heads, s, d = grad.shape
    return grad if heads == kv_heads else grad.view(b, kv_heads, heads // kv_heads, s, d).sum(2)


# -- math: the reference, tiled over query rows -----------------------------------------------


# Scores are materialised ([b, heads, rows, cols] fp32, and three such in backward): query rows go
# through in tiles of at most this many scores, so the transient stays a few MB however long the
# sequence, as a flash kernel's tiles would.
_TILE_SCORES = 2**20


class MathKernel:
    name = "math"

    @staticmethod
    def _scores(q, k, mask) -> torch.Tensor:
        """q [b, heads, sq, d], k [b, kv_heads, sk, d] -> [b, kv_heads, group, sq, sk], masked -inf."""
        b, heads, sq, d = q.shape
        kv_heads = k.shape[1]
        qg = widen(q).reshape(b, kv_heads, heads // kv_heads, sq, d)
        s = torch.matmul(qg, widen(k).unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(d))
        if mask is not None:
            s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
        return s

    @staticmethod
    def _tiles(q, k) -> tuple[range, int]:
        """(tile starts, tile rows) over q's rows."""
        b, heads, rows, _ = q.shape
        step = max(1, _TILE_SCORES // (b * heads * k.shape[2]))
        return range(0, rows, step), step

    def forward(self, q, k, v, block: Block):
        b, heads, rows, d = q.shape
        starts, step = self._tiles(q, k)
        outs, lses = [], []
        for start in starts:
            stop = min(start + step, rows)
            s = self._scores(q[:, :, start:stop], k, block.mask_rows(start, stop, k.shape[2], q.device))
            lse = torch.logsumexp(s, dim=-1)  # [b, kv_heads, group, tile]
            p = torch.exp(s - finite_lse(lse).unsqueeze(-1))
            outs.append(torch.matmul(p, widen(v).unsqueeze(2)).reshape(b, heads, stop - start, d))
            lses.append(lse.reshape(b, heads, stop - start))
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    def backward(self, dout, q, k, v, out, lse, delta, block: Block):
        b, heads, rows, d = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        dq = torch.empty(q.shape, dtype=delta.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=delta.dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=delta.dtype, device=q.device)
        starts, step = self._tiles(q, k)
        for start in starts:
            r = slice(start, min(start + step, rows))
            n = r.stop - r.start
            s = self._scores(q[:, :, r], k, block.mask_rows(r.start, r.stop, k.shape[2], q.device))
            p = torch.exp(s - finite_lse(lse[:, :, r]).reshape(b, kv_heads, group, n, 1))
            do = widen(dout[:, :, r]).reshape(b, kv_heads, group, n, d)
            dv += torch.matmul(p.transpose(-1, -2), do).sum(2)
            dp = torch.matmul(do, widen(v).unsqueeze(2).transpose(-1, -2))
            ds = p * (dp - delta[:, :, r].reshape(b, kv_heads, group, n, 1)) * (1.0 / math.sqrt(d))
            dq[:, :, r] = torch.matmul(ds, widen(k).unsqueeze(2)).reshape(b, heads, n, d)
            dk += torch.matmul(ds.transpose(-1, -2), widen(q[:, :, r]).reshape(b, kv_heads, group, n, d)).sum(2)
        return dq, dk, dv


# -- CPU: torch's fused flash kernel ---------------------------------------------------------------


class CpuFlashKernel:
    name = "cpu_flash"

    def forward(self, q, k, v, block: Block):
        mask = None if block.mask is None else block.bias(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, block.causal, attn_mask=mask
        )
        return _no_key_rows(out, lse, block)

    def backward(self, dout, q, k, v, out, lse, delta, block: Block):
        mask = None if block.mask is None else block.bias(q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            dout, q, k, v, out, lse.contiguous(), 0.0, block.causal, attn_mask=mask
        )


# -- CUDA: torch's flash and memory-efficient kernels ----------------------------------------------

_HALF = (torch.float16, torch.bfloat16)
_EFFICIENT_LSE_ROWS = 32  # the memory-efficient kernel's lse rows are padded to a multiple of 32
_EFFICIENT_BIAS_ALIGN = 16  # ... and its attn_bias rows must start at multiples of 16 elements


def _flash_takes(q: torch.Tensor, block: Block) -> bool:
    return block.mask is None and q.dtype in _HALF and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


class CudaSdpaKernel:
    name = "cuda_sdpa"

    def forward(self, q, k, v, block: Block):
        heads = q.shape[1]
        k, v = _expand(k, heads), _expand(v, heads)
        if _flash_takes(q, block):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, block.causal)[:2]
            return out, lse
        bias = None if block.mask is None else block.bias(q.dtype, align=_EFFICIENT_BIAS_ALIGN)
        if bias is not None:
            bias = bias.expand(q.shape[0], heads, q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention.default(
            q, k, v, bias, True, 0.0, block.causal
        )[:2]
        return _no_key_rows(out, lse[:, :, : q.shape[2]], block)

    def backward(self, dout, q, k, v, out, lse, delta, block: Block):
        b, heads, rows, _ = q.shape
        kv_heads = k.shape[1]
        k, v = _expand(k, heads), _expand(v, heads)
        if _flash_takes(q, block):
            seed = torch.empty(2, dtype=torch.uint64, device=q.device)  # read only with dropout
            offset = torch.empty((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
                dout, q, k, v, out, lse.contiguous(), None, None, rows, k.shape[2], 0.0, block.causal, seed, offset
            )
        else:
            bias = None if block.mask is None else block.bias(q.dtype, align=_EFFICIENT_BIAS_ALIGN)
            if bias is not None:
                bias = bias.expand(b, heads, rows, k.shape[2])
            pad = -rows % _EFFICIENT_LSE_ROWS
            lse = torch.nn.functional.pad(lse, (0, pad)).contiguous()
            seed = torch.zeros((), dtype=torch.int64, device=q.device)
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default(
                dout, q, k, v, bias, out, lse, seed, seed, 0.0, [True, True, True, False], block.causal
            )
        return dq, _fold(dk, kv_heads), _fold(dv, kv_heads)


# -- CUDA: the flash-attn package ------------------------------------------------------------------


class FlashAttnKernel:
    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

        self._fwd, self._bwd = _flash_attn_forward, _flash_attn_backward
        self._masked = CudaSdpaKernel()

    @staticmethod
    def _options(q, block: Block) -> dict:
        """What forward and backward both pass: no dropout, window, softcap or ALiBi."""
        return dict(
            dropout_p=0.0,
            softmax_scale=q.shape[-1] ** -0.5,
            causal=block.causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
        )

    @staticmethod
    def _layout(*ts):
        """[b, heads, s, d] -> flash-attn's [b, s, heads, d], last dim contiguous."""
        return [t.transpose(1, 2).contiguous() for t in ts]

    def forward(self, q, k, v, block: Block):
        if not _flash_takes(q, block):
            return self._masked.forward(q, k, v, block)
        qt, kt, vt = self._layout(q, k, v)
        out, lse, _, _ = self._fwd(qt, kt, vt, **self._options(q, block), return_softmax=False)
        return out.transpose(1, 2), lse  # lse [b, heads, rows] fp32

    def backward(self, dout, q, k, v, out, lse, delta, block: Block):
        if not _flash_takes(q, block):
            return self._masked.backward(dout, q, k, v, out, lse, delta, block)
        dt, qt, kt, vt, ot = self._layout(dout, q, k, v, out)
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        self._bwd(dt, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv, **self._options(q, block), deterministic=False)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def choose_kernel(name: str, *, device: torch.device, dtype: torch.dtype, backend: str = "sdpa") -> BlockKernel:
    """The block kernel `name` (KERNELS), or for "auto": math in float64 (the reference), the fused
    flash kernel on CPU, flash-attn's kernels on CUDA under model.attention_backend=flash_attn in
    fp16/bf16, torch's CUDA kernels otherwise on CUDA, math elsewhere."""
    if name == "auto":
        if dtype == torch.float64:
            name = "math"
        elif device.type == "cpu":
            name = "cpu_flash"
        elif device.type == "cuda":
            name = "flash_attn" if backend == "flash_attn" and dtype in _HALF else "cuda_sdpa"
        else:
            name = "math"
    kernels = {
        "math": MathKernel,
        "cpu_flash": CpuFlashKernel,
        "cuda_sdpa": CudaSdpaKernel,
        "flash_attn": FlashAttnKernel,
    }
    if name not in kernels:
        raise ValueError(f"ring block kernel {name!r}: must be one of {', '.join(KERNELS)}")
    return kernels[name]()
