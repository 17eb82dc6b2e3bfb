"""Which pipeline stage holds which parts of the GPT, and this rank's model built from that.

Virtual stages (interleaving): rank r holds chunks c = 0..V-1; chunk c of rank r is virtual
stage v = c * P + r and owns layers [v * L/(P V), (v + 1) * L/(P V)). In V order (the zb-v
schedule, V = 2) chunk 0 of rank r is stage r and chunk 1 stage 2P-1-r. The first virtual stage
also holds the embedding, the last the final norm and output layer (and, tied, its own copy of
the embedding). `stage_layout` is the one place that says so: the model builds from it and the
offline reshard asks `stage_owners`, which is derived from it.

Under a zero-bubble schedule the chunks' layers defer their weight gradients to one
WeightGradStore per rank (pretrain/models/weight_grads.py), which the executor finds as the
layer factory's `weight_grads`.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig, RunConfig
from pretrain.models.build import build_gpt
from pretrain.models.gpt import GPT, Stage
from pretrain.models.layers import DenseLayers
from pretrain.models.weight_grads import WeightGradStore, split_weight_gradients
from pretrain.parallel.context import ContextParallel
from pretrain.parallel.expert import ExpertParallel
from pretrain.parallel.tensor import TensorParallelLayers
from pretrain.parallel.topology import Topology


def stage_index(*, pp: int, pp_rank: int, chunk: int, v_shape: bool = False) -> int:
    """The (virtual) stage chunk `chunk` of pipeline rank `pp_rank` runs: chunk * pp + pp_rank,
    or in V order (v_shape) pp_rank for chunk 0 and 2 pp - 1 - pp_rank for chunk 1."""
    if v_shape and chunk == 1:
        return 2 * pp - 1 - pp_rank
    return chunk * pp + pp_rank


def stage_layout(*, num_layers: int, pp: int, vp: int, pp_rank: int, chunk: int, v_shape: bool = False) -> Stage:
    """The layers of chunk `chunk` on pipeline rank `pp_rank` (its stage_index)."""
    stages = pp * vp
    per_stage = num_layers // stages
    v = stage_index(pp=pp, pp_rank=pp_rank, chunk=chunk, v_shape=v_shape)
    return Stage(layer_ids=range(v * per_stage, (v + 1) * per_stage), first=v == 0, last=v == stages - 1)


def stage_owners(name: str, config: RunConfig) -> list[int]:
    """The pipeline ranks that hold GPT parameter `name` at the config's layout (the tied GPT-2
    embedding lives on the first and, as the output layer's copy, on the last stage)."""
    pp, vp, model = config.parallel.pipeline, config.parallel.virtual_stages, config.model
    v_shape = config.parallel.pipeline_schedule == "zb-v"
    return sorted(
        {
            pp_rank
            for pp_rank in range(pp)
            for chunk in range(vp)
            if stage_layout(
                num_layers=model.num_layers, pp=pp, vp=vp, pp_rank=pp_rank, chunk=chunk, v_shape=v_shape
            ).holds(name, tied=model.tied)
        }
    )


def build_model_chunks(
    config: ModelConfig, topo: Topology, *, init_seed: int, dtype: torch.dtype = torch.float32
) -> list[GPT]:
    """This rank's model: the whole GPT without pipelining, else one chunk per virtual stage.
    Built directly on the training device in the weights' dtype (pretrain/models/build.py: no
    full fp32 copy first), initialised to the single-device weights' shards."""
    layers = TensorParallelLayers(topo) if topo.tp > 1 else DenseLayers(context=ContextParallel.of(topo))
    layers.expert_parallel = ExpertParallel.of(topo)  # the MoE layers' experts and all-to-all
    if topo.pp == 1:
        return [build_gpt(config, layers=layers, init_seed=init_seed, device=topo.device, dtype=dtype)]
    chunks = [
        build_gpt(
            config,
            layers=layers,
            init_seed=init_seed,
            device=topo.device,
            dtype=dtype,
            stage=stage_layout(
                num_layers=config.num_layers,
                pp=topo.pp,
                vp=topo.virtual_stages,
                pp_rank=topo.pp_rank,
                chunk=c,
                v_shape=topo.v_shape,
            ),
        )
        for c in range(topo.virtual_stages)
    ]
    if topo.pipeline_schedule in ("zb-h1", "zb-v"):
        store = WeightGradStore(topo.device)
        for chunk in chunks:
            split_weight_gradients(chunk, store)
    return chunks
