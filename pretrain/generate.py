"""Sampling from a trained model (no KV cache: for short samples from small models)."""

from __future__ import annotations

import torch

from pretrain.models.gpt import GPT


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
) -> list[int]:
    """Continue `prompt` by up to max_new_tokens ids; temperature 0 decodes greedily."""
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    window = model.config.positions
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -window:])[0, -1].float()  # [vocab]
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
