"""Sampling from a trained model (no KV cache: for short samples from small models)."""

from __future__ import annotations

import torch

from pretrain.models.gpt import GPT


def heal_prompt(tokenizer, text: str) -> tuple[list[int], list[int] | None]:
    """Token healing: (the prompt's ids without its last token, the ids whose text starts with
    that token's text), or (all ids, None) for a prompt of one token.

    A prompt ending inside what training text spells as one token ends in an odd one: with
    sentencepiece, `"def "` is `def` + a lone space piece, which in the corpus precedes only what
    does not merge with a space (digits, symbols), so the model continues `def ` with digits.
    Sampling the last token again, among those that extend its text, lets `▁main` follow."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        return ids, None
    tail = tokenizer.decode(ids[-1:])
    allowed = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).startswith(tail)]
    return ids[:-1], allowed or [ids[-1]]


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    stop_token: int | None = None,
    first_tokens: list[int] | None = None,
) -> list[int]:
    """Continue `prompt` by up to max_new_tokens ids; temperature 0 decodes greedily.
    `first_tokens`: the first id is drawn among these only (heal_prompt)."""
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    window = model.config.positions
    for n in range(max_new_tokens):
        logits = model(tokens[:, -window:])[0, -1].float()  # [vocab]
        if n == 0 and first_tokens is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[first_tokens] = 0.0
            logits = logits + keep
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
        if next_id == stop_token:
            break
    return tokens[0, len(prompt) :].tolist()
