"""Which pipeline stage holds which parts of the GPT, and this rank's model built from that.

Virtual stages (interleaving): rank r holds chunks c = 0..V-1; chunk c of rank r is virtual
stage v = c * P + r and owns layers [v * L/(P V), (v + 1) * L/(P V)). The first virtual stage
also holds the embedding, the last the final norm and output layer (and, tied, its own copy of
the embedding). `stage_layout` is the one place that says so: the model builds from it and the
offline reshard asks `stage_owners`, which is derived from it.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig, RunConfig
from pretrain.models.build import build_gpt
from pretrain.models.gpt import GPT, Stage
from pretrain.models.layers import DenseLayers
from pretrain.parallel.context import ContextParallel
from pretrain.parallel.tensor import TensorParallelLayers
from pretrain.parallel.topology import Topology


def stage_layout(*, num_layers: int, pp: int, vp: int, pp_rank: int, chunk: int) -> Stage:
    """The layers of chunk `chunk` on pipeline rank `pp_rank` (virtual stage chunk * pp + pp_rank)."""
    stages = pp * vp
    per_stage = num_layers // stages
    v = chunk * pp + pp_rank
    return Stage(layer_ids=range(v * per_stage, (v + 1) * per_stage), first=v == 0, last=v == stages - 1)


def stage_owners(name: str, config: RunConfig) -> list[int]:
    """The pipeline ranks that hold GPT parameter `name` at the config's layout (the tied GPT-2
    embedding lives on the first and, as the output layer's copy, on the last stage)."""
    pp, vp, model = config.parallel.pipeline, config.parallel.virtual_stages, config.model
    return sorted(
        {
            pp_rank
            for pp_rank in range(pp)
            for chunk in range(vp)
            if stage_layout(num_layers=model.num_layers, pp=pp, vp=vp, pp_rank=pp_rank, chunk=chunk).holds(
                name, tied=model.tied
            )
        }
    )


def build_model_chunks(
    config: ModelConfig, topo: Topology, *, init_seed: int, dtype: torch.dtype = torch.float32
) -> list[GPT]:
    """This rank's model: the whole GPT without pipelining, else one chunk per virtual stage.
    Built directly on the training device in the weights' dtype (pretrain/models/build.py: no
    full fp32 copy first), initialised to the single-device weights' shards."""
    layers = TensorParallelLayers(topo) if topo.tp > 1 else DenseLayers(context=ContextParallel.of(topo))
    if topo.pp == 1:
        return [build_gpt(config, layers=layers, init_seed=init_seed, device=topo.device, dtype=dtype)]
    return [
        build_gpt(
            config,
            layers=layers,
            init_seed=init_seed,
            device=topo.device,
            dtype=dtype,
            stage=stage_layout(
                num_layers=config.num_layers, pp=topo.pp, vp=topo.virtual_stages, pp_rank=topo.pp_rank, chunk=c
            ),
        )
        for c in range(topo.virtual_stages)
    ]
