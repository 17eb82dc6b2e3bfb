"""The single-device GPT: shapes, causality, attention against a naive reference, init,
activation checkpointing and bf16 autocast, for both flavours."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT

FLAVOURS = {
    "gpt2": {
        "flavour": "gpt2",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 300,
        "seq_length": 32,
    },
    "llama": {
        "flavour": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vocab_size": 300,
        "seq_length": 32,
    },
}


def make(flavour, **changes):
    torch.manual_seed(0)
    return GPT(config_from_dict({"model": {**FLAVOURS[flavour], **changes}}).model)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shapes_and_loss(flavour):
    model = make(flavour)
    tokens = torch.randint(0, 300, (3, 32))
    logits = model(tokens)
    assert logits.shape == (3, 32, 300)  # real vocabulary, padding rows sliced off
    assert model.embed.weight.shape[0] == 384  # padded to a multiple of 128
    labels = torch.randint(0, 300, (3, 32))
    loss = model(tokens, labels=labels)
    # The loss runs over the real vocabulary: padding rows never enter the softmax, so the loss
    # is the same at any padding (TP size) and in an exported model without padding.
    full = model.head_logits(model.run_blocks(model.embed_tokens(tokens)))
    assert full.shape[-1] == 384
    assert torch.allclose(loss, F.cross_entropy(full[..., :300].flatten(0, 1), labels.flatten()))
    assert abs(loss.item() - math.log(300)) < 0.5  # near uniform at init
    labels[:, :16] = -100
    assert torch.isfinite(model(tokens, labels=labels))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_causality(flavour):
    model = make(flavour).eval()
    tokens = torch.randint(0, 300, (2, 32))
    base = model(tokens)
    for t in (0, 7, 31):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 300
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert not torch.allclose(out[:, t:], base[:, t:])


def naive_attention(module, x, rope):
    """softmax(q k^T / sqrt(d) + causal mask) v with K/V heads repeated per group."""
    b, s, _ = x.shape
    heads, kv, d = module.heads, module.kv_heads, module.head_dim
    group = heads // kv
    qkv = module.qkv(x).view(b, s, kv, group + 2, d)
    q = qkv[:, :, :, :group].reshape(b, s, heads, d).transpose(1, 2)
    k = qkv[:, :, :, group].transpose(1, 2).repeat_interleave(group, dim=1)
    v = qkv[:, :, :, group + 1].transpose(1, 2).repeat_interleave(group, dim=1)
    if rope is not None:
        cos, sin = rope

        def rot(t):
            t1, t2 = t[..., : d // 2], t[..., d // 2 :]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        q, k = rot(q), rot(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return module.proj(out.transpose(1, 2).reshape(b, s, heads * d))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_attention_matches_naive_reference(flavour):
    model = make(flavour).eval()
    x = torch.randn(2, 32, 64)
    rope = (model.rope_cos[:32], model.rope_sin[:32]) if flavour == "llama" else None
    attn = model.blocks["0"].attn
    assert torch.allclose(attn(x, rope), naive_attention(attn, x, rope), atol=1e-5)


def test_rope_is_relative():
    """RoPE attention scores depend only on the distance between positions."""
    from pretrain.models.gpt import rope_tables
    from pretrain.models.kernels.reference import rope as apply_rope

    cos, sin = rope_tables(positions=32, head_dim=16, theta=10000.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 32, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 32, 16)
    scores = (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2))[0, 0]
    assert torch.allclose(scores[5, 2], scores[10, 7], atol=1e-5)
    assert torch.allclose(scores[20, 20], scores[3, 3], atol=1e-5)
    assert not torch.allclose(scores[5, 2], scores[5, 4], atol=1e-3)


def test_flavour_structure():
    gpt2, llama = make("gpt2"), make("llama")
    assert gpt2.head is None and gpt2.pos_embed is not None  # tied, learned positions
    assert isinstance(gpt2.blocks["0"].norm1, torch.nn.LayerNorm) and gpt2.blocks["0"].attn.qkv.bias is not None
    assert llama.head is not None and llama.pos_embed is None  # untied, RoPE
    assert isinstance(llama.blocks["0"].norm1, torch.nn.RMSNorm) and llama.blocks["0"].attn.qkv.bias is None
    # GQA: 4 query heads and 2 kv heads of 16 -> (4 + 2*2) * 16 fused rows; SwiGLU gate|up.
    assert llama.blocks["0"].attn.qkv.weight.shape == (128, 64)
    assert llama.blocks["0"].mlp.fc1.weight.shape == (2 * llama.config.ffn_size, 64)


def test_megatron_init():
    model = make("gpt2", num_layers=8, hidden_size=256, num_heads=4)
    std = lambda p: p.detach().std().item()
    assert std(model.blocks["0"].attn.qkv.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks["0"].attn.proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(model.blocks["3"].mlp.fc2.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(model.blocks["0"].attn.qkv.bias == 0) and torch.all(model.blocks["0"].norm1.weight == 1)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_loss_and_grads(flavour, mode):
    tokens = torch.randint(0, 300, (2, 32))
    plain, recomputed = make(flavour), make(flavour, activation_checkpointing=mode)
    recomputed.load_state_dict(plain.state_dict())
    for model in (plain, recomputed):
        model(tokens, labels=tokens).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dropout_only_in_training(flavour):
    model = make(flavour, dropout=0.2)
    tokens = torch.randint(0, 300, (2, 32))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bf16_autocast_close_to_fp32(flavour):
    model = make(flavour)
    tokens = torch.randint(0, 300, (2, 32))
    fp32 = model(tokens, labels=tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(tokens, labels=tokens)
    assert bf16.dtype == torch.float32  # the loss is computed in fp32
    assert abs(bf16.item() - fp32.item()) < 0.05
    bf16.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="longer than"):
        make("gpt2")(torch.zeros(1, 33, dtype=torch.long))
