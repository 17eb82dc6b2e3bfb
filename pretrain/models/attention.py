"""Attention core: softmax(QK^T / sqrt(d)) V, causal or not, optionally only within documents.

Backends (model.attention_backend):
- `sdpa` (default): torch's `scaled_dot_product_attention`, which dispatches to FlashAttention /
  cuDNN / memory-efficient kernels on GPU and to a fused flash kernel on CPU. Grouped-query
  attention is passed as `enable_gqa`, so K/V are never copied per query head.
- `flash_attn`: the flash-attn package's kernels (GPU, bf16/fp16), when installed. Documents
  become variable-length sequences (`flash_attn_varlen_func`), so no mask is materialised.

Document masking (data.document_attention_mask): `segments` [b, s] numbers the documents packed
into each sequence; a token attends only to earlier tokens of its own document. With SDPA this
is a boolean [b, 1, s, s] mask (which rules out the flash kernels of SDPA: the memory-efficient
kernel runs on GPU); with flash-attn it costs nothing extra. Either form is derived once per
forward (`Documents`, built by GPT.run_blocks) and shared by every layer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError

BACKENDS = ("sdpa", "flash_attn")


class BackendUnavailable(ConfigError):
    """A requested attention backend cannot run here; the message says why and what to do."""


def check_backend(backend: str, device: torch.device) -> None:
    """Fail early, with what to do, when `backend` cannot run on `device`."""
    if backend == "flash_attn":
        if device.type != "cuda":
            raise BackendUnavailable(
                "model.attention_backend=flash_attn needs a CUDA GPU; use "
                "model.attention_backend=sdpa (torch's fused attention) on CPU"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise BackendUnavailable(
                "model.attention_backend=flash_attn: the flash-attn package is not "
                "installed (pip install flash-attn --no-build-isolation), or use "
                "model.attention_backend=sdpa, which runs FlashAttention kernels too"
            )


def document_mask(segments: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[b, s] document numbers -> boolean [b, 1, s, s]: True where query i may attend key j."""
    mask = segments[:, None, :, None] == segments[:, None, None, :]
    if causal:
        s = segments.shape[1]
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return mask


@dataclass(frozen=True)
class Documents:
    """The documents packed into a micro-batch, in the form the attention backend takes, derived
    once per forward from segments [b, s] and passed to every layer. Per layer it would cost a
    [b, 1, s, s] mask each (SDPA), or for flash-attn a device-to-host sync each: the offsets'
    length and the longest document must be known on the host."""

    mask: torch.Tensor | None = None  # sdpa: bool [b, 1, s, s], True where query i may see key j
    cu_seqlens: torch.Tensor | None = None  # flash_attn: int32 [docs + 1] over the b * s tokens
    max_len: int = 0  # flash_attn: the longest document

    @staticmethod
    def of(segments: torch.Tensor, *, backend: str, causal: bool) -> Documents:
        if backend == "flash_attn":
            cu_seqlens, max_len = document_offsets(segments)
            return Documents(cu_seqlens=cu_seqlens, max_len=max_len)
        return Documents(mask=document_mask(segments, causal=causal))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    causal: bool = True,
    segments: torch.Tensor | Documents | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """q: [b, heads, s, d]; k, v: [b, kv_heads, s, d] -> [b, heads, s, d]. `causal=False` attends
    in both directions (masked-LM); `segments` keeps attention within documents: [b, s] document
    numbers, or their `Documents` for this backend (computed once for all layers)."""
    if isinstance(segments, torch.Tensor):
        segments = Documents.of(segments, backend=backend, causal=causal)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, dropout_p=dropout_p, causal=causal, documents=segments)
    gqa = k.shape[1] != q.shape[1]
    if segments is None:
        if causal and not dropout_p and _split_queries(q):
            return _causal_in_query_blocks(q, k, v, gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa)
    if gqa and _expand_kv_for_mask(q):
        # CUDA's SDPA runs an explicit mask only in its memory-efficient kernel (flash takes no
        # mask), and that kernel refuses enable_gqa: mask + GQA would fall back to the math
        # kernel, which materialises the [b, heads, s, s] scores in fp32. K/V copied to the query
        # heads (what enable_gqa means: query head i reads kv head i // group) cost heads / kv
        # times their size, far less. Not on CPU: its flash kernel takes mask and GQA together,
        # and the copy measured 1.3x slower there (fp32, s = 512, 8 heads over 2).
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=segments.mask, dropout_p=dropout_p, enable_gqa=gqa)


def _expand_kv_for_mask(q: torch.Tensor) -> bool:
    return q.is_cuda


# torch's CPU flash kernel picks its query tile from the query length: 32 rows below 192, 64 rows
# from 192 to 767, 256 from 768 (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp), keys in
# tiles of 512. In fp32 its 64-row path is slow, above all in the causal backward. Measured with
# torch 2.13 on this project's 2-thread CPU (fp32, [2048 / s, 8 heads, s, 64], fwd + bwd), the same
# attention as query blocks of at most 128 rows, each over its prefix of keys, against one causal
# call: 0.96x at s = 224, 1.03x at 256, 1.07x at 320, 1.12x at 384, 1.20x at 448, 1.32x at 512,
# 1.15x at 576, 1.07x at 704, 1.04x at 760; from 768 one call is faster (the 256-row tile), and in
# bf16 too (0.98x at 512). So: fp32 on CPU, 320 to 767 tokens.
_CPU_SPLIT_LENGTHS = range(320, 768)
_CPU_QUERY_BLOCK = 128


def _split_queries(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[2] in _CPU_SPLIT_LENGTHS


def _causal_in_query_blocks(q, k, v, *, gqa: bool) -> torch.Tensor:
    """Causal attention as row blocks of queries, each over the keys up to its last row: the same
    result as one causal call (each query row sees exactly the same keys)."""
    s = q.shape[2]
    allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    outs = []
    for start in range(0, s, _CPU_QUERY_BLOCK):
        end = min(start + _CPU_QUERY_BLOCK, s)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=allowed[start:end, :end], enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2)


def _flash_attn(q, k, v, *, dropout_p: float, causal: bool, documents: Documents | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, heads, s, d = q.shape
    # flash-attn takes [b, s, heads, d] and pairs query heads with kv heads itself (GQA).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if documents is None:
        out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
        return out.transpose(1, 2)
    # Each document of each sequence is one variable-length sequence of the flattened batch.
    cu_seqlens, max_len = documents.cu_seqlens, documents.max_len
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p, causal=causal)
    return out.view(b, s, heads, d).transpose(1, 2)


def document_offsets(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[b, s] document numbers -> (cumulative start offsets int32 [docs + 1] over the flattened
    b * s tokens, longest document), what flash-attn's varlen kernels take."""
    b, s = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # every row starts a document too
    positions = torch.nonzero(starts.flatten(), as_tuple=True)[0]
    cu = torch.cat([positions, torch.tensor([b * s], device=segments.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
