"""The `parallel:` section: tensor, pipeline, context and data parallelism, ZeRO, and
communication limits. Describes the layout only; the process groups are pretrain.parallel's, which this
package never imports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import _need

CONTEXT_ATTENTION = ("all_gather", "ring")
ZERO_BUBBLE = ("zb-h1", "zb-v")


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (Megatron column/row split); keep it within a node."""
    pipeline: int = 1
    """Pipeline-parallel stages."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    pipeline_schedule: Literal["1f1b", "interleaved", "zb-h1", "zb-v"] | None = None
    """The pipeline schedule: `1f1b`; `interleaved` (needs virtual_stages > 1); `zb-h1` and
    `zb-v`, the zero-bubble schedules (each backward split into the input gradient, on the
    critical path, and the weight gradients, run where the pipeline would idle): zb-h1 keeps
    1F1B's order and memory peak, zb-v puts two stages on each rank in V order (rank r: stages r
    and 2 x pipeline - 1 - r; it implies virtual_stages=2; rank 0 holds the embedding and the
    output layer, and sums a tied embedding's two copies' gradients itself). Unset: 1f1b, or
    interleaved when virtual_stages > 1."""
    sequence_parallel: bool = False
    """Split activations outside tensor-parallel regions along the sequence."""
    context: int = 1
    """Context-parallel size: each sequence is split over this many ranks (long context). The
    sequence is cut into 2 x context chunks and rank i holds chunks i and 2 x context - 1 - i, so
    every rank gets the same share of the causal attention's work; model.seq_length must be a
    multiple of 2 x context. Gradients are averaged over the data x context ranks."""
    context_attention: str = "all_gather"
    """How attention crosses the context-parallel ranks: `all_gather` gathers every rank's keys
    and values before a local attention (Llama 3's choice: any attention kernel, and grouped-query
    attention keeps K/V small), `ring` passes K/V blocks from rank to rank, overlapping each
    transfer with the attention on the block before, and merges the partial results by their
    log-sum-exp (memory for one remote block instead of the whole sequence's K/V)."""
    expert: int = 1
    """Expert-parallel size (model.moe): the experts are split over this many ranks carved out
    of the data-parallel ranks, as Megatron does (it must divide the data-parallel size; each
    group of `expert` consecutive DP ranks holds all experts between them, num_experts / expert
    each, and exchanges tokens by all-to-all; everything else stays replicated over all DP
    ranks). Expert gradients are averaged over the ranks holding the same experts (the other
    EP groups, and the context-parallel ranks)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 = plain data parallelism): 1 shards the optimizer state
    across the data-parallel ranks, 2 also the gradients, 3 also the weights. Needs the `zero`
    extra (deepspeed); the DeepSpeed config is generated from this run config."""
    offload_optimizer: bool = False
    """ZeRO: keep the optimizer state (fp32 master weights, Adam moments) in CPU memory and run
    the optimizer step there (DeepSpeed ZeRO-Offload); needs parallel.zero_stage >= 1."""
    offload_params: bool = False
    """ZeRO-3: keep the weight shards in CPU memory between uses; needs parallel.zero_stage=3."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank (norms, biases),
    which saves many tiny gathers; 0 partitions every parameter."""
    bucket_mb: float = 25.0
    """Data-parallel gradients are all-reduced in buckets of about this many MB, each started
    as soon as its gradients are ready so communication overlaps the backward pass."""
    timeout_minutes: float = 10.0
    """How long a rank waits to reach the master at start, and for any collective, before it
    fails with a message instead of hanging."""

    def validate(self) -> None:
        """Sizes, and the ZeRO combinations we support (the one that depends on the model's tied
        embeddings is a cross-section check, _check_zero_with_pipeline)."""
        for key in ("tensor", "pipeline", "virtual_stages", "context", "expert"):
            _need(getattr(self, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(self, key)}")
        _need(
            self.virtual_stages == 1 or self.pipeline > 1,
            "parallel.virtual_stages",
            "interleaving needs parallel.pipeline > 1",
        )
        _need(not self.sequence_parallel or self.tensor > 1, "parallel.sequence_parallel", "needs parallel.tensor > 1")
        self._validate_schedule()
        _need(
            self.context_attention in CONTEXT_ATTENTION,
            "parallel.context_attention",
            f"must be one of {', '.join(CONTEXT_ATTENTION)}, got {self.context_attention!r}",
        )
        _need(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _need(self.bucket_mb > 0, "parallel.bucket_mb", f"must be positive, got {self.bucket_mb}")
        _need(self.timeout_minutes > 0, "parallel.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        _need(
            not self.offload_optimizer or self.zero_stage >= 1,
            "parallel.offload_optimizer",
            "needs parallel.zero_stage >= 1 (the optimizer state is offloaded by DeepSpeed's ZeRO optimizer)",
        )
        _need(
            not self.offload_params or self.zero_stage == 3,
            "parallel.offload_params",
            "needs parallel.zero_stage=3 (only ZeRO-3 partitions the weights, which is what gets offloaded)",
        )
        _need(
            self.zero3_persistence_threshold >= 0,
            "parallel.zero3_persistence_threshold",
            f"must be >= 0, got {self.zero3_persistence_threshold}",
        )
        _need(
            not (self.zero_stage == 3 and self.pipeline > 1),
            "parallel.zero_stage",
            "ZeRO-3 with parallel.pipeline > 1 is not supported: ZeRO-3 gathers each weight around its "
            "module's forward and backward through hooks on the whole model, while a pipeline stage runs "
            "slices of the model on activations received from another rank, so every weight would be "
            "gathered and released once per micro-batch with nothing in flight to hide it (DeepSpeed's own "
            "pipeline engine refuses it too). Use parallel.zero_stage=1 or 2 with pipelining",
        )

    def _validate_schedule(self) -> None:
        """parallel.pipeline_schedule against pipeline and virtual_stages (derive() fills it in
        when unset, and gives zb-v its two chunks)."""
        schedule, vs = self.pipeline_schedule, self.virtual_stages
        if schedule is None:
            return
        _need(  # 1f1b at pipeline 1 is the plain loop (what derive() fills in)
            self.pipeline > 1 or schedule == "1f1b",
            "parallel.pipeline_schedule",
            f"{schedule} schedules a pipeline: set parallel.pipeline > 1 (or leave the schedule unset)",
        )
        if schedule == "interleaved":
            _need(
                vs > 1,
                "parallel.pipeline_schedule",
                "interleaved runs several model chunks per rank: set parallel.virtual_stages > 1",
            )
        elif schedule == "zb-v":
            _need(
                vs in (1, 2),
                "parallel.virtual_stages",
                f"{vs} with parallel.pipeline_schedule=zb-v: zb-v runs exactly two chunks per rank "
                "(rank r holds stages r and 2 x pipeline - 1 - r); leave parallel.virtual_stages unset or 2",
            )
        else:
            _need(
                vs == 1,
                "parallel.virtual_stages",
                f"{vs} with parallel.pipeline_schedule={schedule}: {schedule} runs one chunk per rank; "
                "use parallel.pipeline_schedule=interleaved (or zb-v, two chunks in V order) for "
                "several, or set parallel.virtual_stages=1",
            )

    @property
    def schedule(self) -> str:
        """The schedule that runs: parallel.pipeline_schedule, or when unset 1f1b (interleaved
        when virtual_stages > 1). Unset stays unset in saved configs, so a run resumed or
        resharded with other virtual_stages picks its schedule again."""
        return self.pipeline_schedule or ("interleaved" if self.virtual_stages > 1 else "1f1b")

    def derive_schedule(self) -> None:
        """zb-v's two chunks per rank, as virtual_stages (saved with every checkpoint)."""
        if self.pipeline_schedule == "zb-v":
            self.virtual_stages = 2
