"""Sampling: token healing of a prompt that ends inside a token (tools/generate.py's default)."""

import torch

from pretrain.config import config_from_dict
from pretrain.data.tokenizer import load_tokenizer
from pretrain.generate import generate, heal_prompt
from pretrain.models.gpt import GPT


def test_a_trailing_space_is_drawn_again_among_the_tokens_it_begins(stdlib_data):
    tok = load_tokenizer(stdlib_data["tokenizer"])
    assert [tok.decode([i]) for i in tok.encode("def ")] == ["def", " "]  # the lone space piece
    prompt, allowed = heal_prompt(tok, "def ")
    assert prompt == tok.encode("def")
    texts = [tok.decode([i]) for i in allowed]
    assert all(t.startswith(" ") for t in texts) and tok.encode("def main")[1] in allowed
    assert not any(t.startswith("1") for t in texts) and len(allowed) > 100
    assert heal_prompt(tok, "def") == (tok.encode("def"), None)  # one token: nothing to heal


def test_the_first_token_is_drawn_among_the_allowed_ones():
    config = config_from_dict(
        {"model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 50, "seq_length": 16}}, []
    )
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    for seed in range(5):
        out = generate(model, [1, 2], max_new_tokens=3, temperature=1.0, top_k=0, seed=seed, first_tokens=[7, 9])
        assert out[0] in (7, 9) and len(out) == 3
    greedy = generate(model, [1, 2], max_new_tokens=1, temperature=0, first_tokens=[11])
    assert greedy == [11]
