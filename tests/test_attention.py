"""Attention backends, attention kept within documents, and torch.compile of the blocks."""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, config_from_dict
from pretrain.data.loader import causal_lm_collate, with_document_segments
from pretrain.models.attention import attention, check_backend, document_offsets
from pretrain.models.gpt import GPT

LLAMA = {
    "flavour": "llama",
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 300,
    "seq_length": 48,
}


def test_segments_number_documents_with_their_end_token():
    collate = with_document_segments(causal_lm_collate, eod=0)
    samples = np.array([[5, 6, 0, 7, 8, 0, 0, 9, 4]])
    batch = collate(samples, np.zeros(1))
    assert batch["tokens"].tolist() == [[5, 6, 0, 7, 8, 0, 0, 9]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 3]]  # an EOD closes its own document


def test_document_mask_isolates_documents():
    """llama (RoPE: attention depends on relative positions only): the second document of a
    packed sequence gets the logits it gets alone, and the first is unaffected by the second."""
    model = GPT(config_from_dict({"model": LLAMA}).model, init_seed=1).eval()
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(1, 300, (1, 17), generator=g), torch.randint(1, 300, (1, 31), generator=g)
    first[0, -1] = 0  # its end-of-document token
    packed = torch.cat([first, second], dim=1)
    segments = torch.cat([torch.zeros(1, 17), torch.ones(1, 31)], dim=1).long()
    with torch.no_grad():
        together = model(packed, segments=segments)
        assert (together[:, 17:] - model(second)).abs().max() < 1e-5
        assert (together[:, :17] - model(first)).abs().max() < 1e-5
        assert (model(packed)[:, 17:] - model(second)).abs().max() > 1e-2  # without the mask it leaks


def test_document_mask_in_training_loss_and_grads():
    model = GPT(config_from_dict({"model": LLAMA}).model, init_seed=1)
    tokens = torch.randint(1, 300, (2, 48))
    tokens[:, 20] = 0
    segments = with_document_segments(causal_lm_collate, 0)(
        torch.cat([tokens, tokens[:, :1]], dim=1).numpy(), np.zeros(2)
    )["segments"]
    loss = model(tokens, labels=tokens, segments=segments)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def _fake_flash_attn():
    """A stand-in for the flash-attn package with its documented semantics ([b, s, heads, d]
    layout, GQA by head groups, varlen over cumulative offsets), computed with plain torch."""

    def reference(q, k, v, causal):  # [s, heads, d] x [s, kv, d]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        return torch.stack([reference(q[i], k[i], v[i], causal) for i in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out[start:end] = reference(q[start:end], k[start:end], v[start:end], causal)
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        return out

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_attn_backend_layout_and_documents(monkeypatch):
    """Our flash-attn path (transposes, GQA, documents as varlen sequences) against SDPA, with a
    stand-in package (no GPU here)."""
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 24, 16, generator=g),
        torch.randn(2, 2, 24, 16, generator=g),
        torch.randn(2, 2, 24, 16, generator=g),
    )
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 3 + [2] * 18])
    for segs in (None, segments):
        for causal in (True, False):
            want = attention(q, k, v, causal=causal, segments=segs, backend="sdpa")
            got = attention(q, k, v, causal=causal, segments=segs, backend="flash_attn")
            assert (got - want).abs().max() < 1e-5, (segs is not None, causal)
    cu, longest = document_offsets(segments)
    assert cu.tolist() == [0, 10, 24, 27, 30, 48] and longest == 18


def test_missing_backend_fails_with_what_to_do():
    with pytest.raises(ConfigError, match="flash_attn needs a CUDA GPU"):
        check_backend("flash_attn", torch.device("cpu"))
    check_backend("sdpa", torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.attention_backend"):
        config_from_dict({"model": {**LLAMA, "attention_backend": "flash_attn"}})  # fp32
    with pytest.raises(ConfigError, match="data.document_attention_mask"):
        config_from_dict({"model": LLAMA, "data": {"document_attention_mask": True}})


def test_compiled_blocks_match_eager():
    """model.compile=true: inductor (C++ on this CPU) compiles each block; same loss and
    gradients as eager, same parameter names (checkpoints are interchangeable)."""
    eager = GPT(config_from_dict({"model": LLAMA}).model, init_seed=3)
    compiled = GPT(config_from_dict({"model": {**LLAMA, "compile": True}}).model, init_seed=3)
    assert list(eager.state_dict()) == list(compiled.state_dict())
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss = model(tokens, labels=tokens.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0) > 0.99999, name
        assert (a.grad - b.grad).abs().max() < 1e-4, name


@pytest.mark.parametrize("s,kv_heads", [(512, 4), (330, 2), (700, 1)])
def test_cpu_query_blocks_equal_one_causal_call(s, kv_heads, monkeypatch):
    """fp32 on CPU at 320-767 tokens runs causal attention as query blocks over key prefixes
    (torch's 64-row tile is slow there): same output and gradients as one causal SDPA call,
    also for lengths that are no multiple of the block and for grouped-query attention."""
    import pretrain.models.attention as attention_module

    g = torch.Generator().manual_seed(s)
    q = torch.randn(2, 4, s, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, s, 32, generator=g, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 4, s, 32, generator=g)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_module.F,
        "scaled_dot_product_attention",
        lambda *a, **kw: calls.append(a[0].shape[2]) or real_sdpa(*a, **kw),
    )
    out = attention(q, k, v)
    assert calls == [min(128, s - start) for start in range(0, s, 128)]  # the block path ran
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    monkeypatch.undo()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert (out - ref).abs().max() < 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-4


def test_query_blocks_only_where_they_pay():
    from pretrain.models.attention import _split_queries

    assert _split_queries(torch.empty(1, 1, 512, 8))
    assert not _split_queries(torch.empty(1, 1, 256, 8))  # no faster split below 320
    assert not _split_queries(torch.empty(1, 1, 1024, 8))  # 256-row tile: one call is faster
    assert not _split_queries(torch.empty(1, 1, 512, 8, dtype=torch.bfloat16))  # measured slower


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_with_document_mask_copies_kv_to_query_heads_where_asked(causal, monkeypatch):
    """On CUDA, mask + GQA copies K/V to the query heads (so SDPA's memory-efficient kernel can
    run instead of the math one): the same attention, forward and backward, as enable_gqa."""
    import pretrain.models.attention as attention_module

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 40, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 6, 40, 16, generator=g)
    segments = torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 10])
    want = attention(q, k, v, causal=causal, segments=segments)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module, "_expand_kv_for_mask", lambda q: True)
    monkeypatch.setattr(
        attention_module.F,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: calls.append((k.shape[1], kw.get("enable_gqa"))) or real_sdpa(q, k, v, **kw),
    )
    got = attention(q, k, v, causal=causal, segments=segments)
    grads = torch.autograd.grad(got, (q, k, v), grad_out)
    assert calls == [(6, False)]  # K/V at the query heads' count, no enable_gqa
    assert (got - want).abs().max() < 1e-6
    for a, b in zip(grads, want_grads):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_document_offsets_once_per_forward(checkpointing, monkeypatch):
    """flash-attn + document masks: the offsets (a device-to-host sync on a GPU) are computed
    once per forward of the model, not once per layer, recomputation included; the loss and
    gradients are those of SDPA's masked attention."""
    import pretrain.models.attention as attention_module

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    calls = []
    real_offsets = attention_module.document_offsets
    monkeypatch.setattr(attention_module, "document_offsets", lambda s: calls.append(1) or real_offsets(s))
    model_config = {**LLAMA, "num_layers": 3, "activation_checkpointing": checkpointing}
    config = config_from_dict(
        {"model": {**model_config, "attention_backend": "flash_attn"}, "train": {"precision": "bf16"}}
    ).model
    flash = GPT(config, init_seed=5)
    sdpa = GPT(config_from_dict({"model": model_config}).model, init_seed=5)
    tokens = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    tokens[0, 10], tokens[1, 30] = 0, 0
    segments = with_document_segments(causal_lm_collate, 0)(
        torch.cat([tokens, tokens[:, :1]], dim=1).numpy(), np.zeros(2)
    )["segments"]
    losses = []
    for model in (flash, sdpa):
        loss = model(tokens, labels=tokens, segments=segments)
        loss.backward()
        losses.append(loss.item())
    assert len(calls) == 1
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(flash.named_parameters(), sdpa.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name
