"""What the Hugging Face conversion tests share: a quiet log, random weights everywhere, the
largest logit difference between our model and transformers', bit-exact safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

QUIET = {"log": lambda message: None}


def perturbed(model):
    """Random weights everywhere (transformers zero-initialises biases and routers and sets norms
    to one, which a mapping that mixed them up could pass); the model in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def max_logit_diff(ours, theirs, *, vocab_size: int = 1001, seq: int = 64) -> float:
    """max |our logits - transformers' logits| over 2 random sequences of `seq` tokens."""
    tokens = torch.randint(0, vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    assert a.shape == b.shape == (2, seq, vocab_size)
    return (a - b).abs().max().item()


def assert_same_tensors(a_file: Path, b_file: Path) -> None:
    """Two safetensors files hold the same names, dtypes and bits."""
    a, b = load_file(a_file), load_file(b_file)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
