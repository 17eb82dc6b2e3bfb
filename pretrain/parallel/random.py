"""Per-rank RNG streams, so dropout is consistent where it must be and independent where it may.

Outside tensor-parallel regions the activations are replicated on every TP rank, so their
dropout masks must be identical: those use torch's default generator, seeded the same on all
TP ranks. Inside a TP region (the attention probabilities of this rank's heads) each rank
holds different data and needs its own mask: `tensor_parallel_rng` runs that region on a
generator seeded from one draw of the default stream plus the TP rank.

Deriving the region's seed from the default stream (instead of keeping a separate generator
that advances on its own) makes it safe under activation checkpointing: recomputation
restores the default generator, so the same seed, and the same mask, come back.
"""

from __future__ import annotations

import contextlib

import torch

# A large odd constant keeps the streams of different TP ranks far apart.
_RANK_STRIDE = 0x9E3779B97F4A7C15 % (2**61)


@contextlib.contextmanager
def tensor_parallel_rng(tp_rank: int):
    seed = int(torch.randint(0, 2**62, (1,)))  # the same on every TP rank
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed + _RANK_STRIDE * (tp_rank + 1)) % (2**63))
        yield
