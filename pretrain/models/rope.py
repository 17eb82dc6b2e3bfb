"""RoPE's rotation frequencies, with Llama 3's long-context scaling (model.rope_scaling).

Computed in float64 (gpt.rope_tables turns them into the fp32 cos/sin tables): at 128k positions
an fp32 angle position * inv_freq is off by a good fraction of a radian for the fast rotations.
"""

from __future__ import annotations

import math

import torch

from pretrain.config.model import RopeScaling


def rope_inv_freq(*, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """[head_dim / 2] float64 rotation frequencies (radians per position) of the pairs
    (i, i + head_dim/2): theta^(-2i/head_dim), then scaled when `scaling` says so."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    return llama3_scaled(inv_freq, scaling)


def llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule (the rope_type "llama3" of transformers, Meta's reference code): by
    wavelength 2*pi/f against the original context L, frequencies with a wavelength longer than
    L / low_freq_factor are divided by `factor` (positions beyond L then rotate them no further
    than the pretraining did), those shorter than L / high_freq_factor (local patterns the model
    relies on) stay, and in between the two are blended with a weight linear in L / wavelength."""
    L = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    # 0 at the long-wavelength edge of the band (wavelength = L / low), 1 at the short one.
    smooth = ((L / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    keep = wavelength < L / high
    slow = wavelength > L / low
    return torch.where(keep, inv_freq, torch.where(slow, inv_freq / scaling.factor, blended))
