"""The `model.moe:` sub-section: which blocks are mixtures of experts and how they route, and
the rules that span it and `parallel:` (how the experts split over tensor-parallel ranks, what
is not supported yet)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import _need

if typing.TYPE_CHECKING:
    from pretrain.config.model import ModelConfig
    from pretrain.config.run import RunConfig


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP in every (or every N-th) block: a router sends each token to its
    top_k of num_experts feed-forward experts and sums their outputs weighted by the router's
    scores; shared experts (DeepSeek) see every token. Dropless by default: every token reaches
    its top_k experts however unevenly they are loaded."""

    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_hidden_size: int | None = None
    """Width of each routed expert's MLP; default model.ffn_hidden_size (its derived value)."""
    layer_interval: int = 1
    """Every N-th block is a MoE layer: blocks N-1, 2N-1, ... (0-based; Qwen2-MoE's
    decoder_sparse_step); the others keep the dense MLP. 1: every block."""
    shared_experts: int = 0
    """Experts every token goes through besides its routed ones (DeepSeek's shared experts),
    built as one MLP of shared_experts x shared_ffn_hidden_size."""
    shared_ffn_hidden_size: int | None = None
    """Width of each shared expert; default the routed experts' width."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """`softmax`: top-k of softmax(x W) with the Switch/GShard load-balancing loss (Mixtral,
    Qwen-MoE). `sigmoid`: top-k of sigmoid(x W) + a per-expert bias that is not learned by
    gradient but moved after every step towards equal load (DeepSeek-V3's auxiliary-loss-free
    balancing); the bias only chooses the experts, the weights are the plain sigmoid scores."""
    normalize_top_k: bool = True
    """Divide each token's top-k weights by their sum (Mixtral, DeepSeek-V3); Qwen2-MoE's
    default keeps the softmax probabilities as they are (its norm_topk_prob=false)."""
    aux_loss_coeff: float | None = None
    """Weight of the load-balancing loss E x sum_e f_e P_e (f_e: share of the micro-batch's
    token-expert assignments going to expert e, P_e: the mean router probability of e; 1.0 when
    perfectly balanced) in the training objective, per MoE layer. Default 0.01 for the softmax
    router, 0 for the sigmoid router (which balances through its bias)."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss, the mean squared log-sum-exp of the router logits (ST-MoE;
    1e-3 is the usual value), which keeps the logits small. 0: off."""
    bias_update_rate: float = 0.001
    """Sigmoid router: after each optimizer step every expert's bias moves by this much, up for
    experts below the mean load of the step, down for those above (DeepSeek-V3's gamma)."""
    capacity_factor: float | None = None
    """Null: dropless. Else each expert takes at most ceil(capacity_factor x tokens x top_k /
    num_experts) assignments per micro-batch, first come first served in token order; the
    rest are dropped (the token keeps its residual and its other experts) and counted in the
    metrics (moe_dropped_tokens)."""
    grouped_mm: bool | None = None
    """Run all experts as one grouped matmul (torch.nn.functional.grouped_mm) where torch offers
    it for the device, dtype and widths (widths a multiple of 8); false, or where it does not:
    one matmul per expert in a loop. Null: the grouped matmul on GPUs (one kernel instead of one
    per expert), the loop on CPUs, where it measured faster (bench/RESULTS.md, "Mixture of
    experts")."""

    # Derived values: read these, not the optional fields above.
    def expert_ffn(self, model: ModelConfig) -> int:
        return self.ffn_hidden_size or model.ffn_size

    def shared_ffn(self, model: ModelConfig) -> int:
        """Width of the one MLP that holds all shared experts (0: none)."""
        return self.shared_experts * (self.shared_ffn_hidden_size or self.expert_ffn(model))

    @property
    def aux_coeff(self) -> float:
        if self.aux_loss_coeff is not None:
            return self.aux_loss_coeff
        return 0.01 if self.router == "softmax" else 0.0

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.layer_interval == self.layer_interval - 1

    def layer_ids(self, num_layers: int) -> list[int]:
        """The 0-based indices of the MoE blocks of a model of num_layers blocks."""
        return [i for i in range(num_layers) if self.is_moe_layer(i)]

    def active_mlp_weights(self, model: ModelConfig) -> int:
        """Matmul weights one token's forward goes through in a MoE block's MLP: the router, its
        top_k routed experts and the shared experts (the FLOPs count; all experts are in memory)."""
        parts = 3 if model.flavour == "llama" else 2  # SwiGLU: gate, up, down
        h = model.hidden_size
        gate = h if self.shared_expert_gate else 0
        return h * self.num_experts + parts * h * (self.top_k * self.expert_ffn(model) + self.shared_ffn(model)) + gate

    def capacity(self, tokens: int) -> int | None:
        """Assignments one expert takes from a micro-batch of `tokens` tokens (None: all)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def validate(self, model: ModelConfig) -> None:
        key = "model.moe"
        _need(self.num_experts >= 1, f"{key}.num_experts", f"must be >= 1, got {self.num_experts}")
        _need(
            1 <= self.top_k <= self.num_experts,
            f"{key}.top_k",
            f"must be between 1 and model.moe.num_experts={self.num_experts}, got {self.top_k}",
        )
        _need(self.expert_ffn(model) > 0, f"{key}.ffn_hidden_size", f"must be positive, got {self.ffn_hidden_size}")
        _need(
            1 <= self.layer_interval <= model.num_layers,
            f"{key}.layer_interval",
            f"must be between 1 and model.num_layers={model.num_layers} (block N-1 is the first MoE "
            f"block), got {self.layer_interval}",
        )
        self._validate_shared(key)
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            value = getattr(self, name)
            _need(value is None or value >= 0, f"{key}.{name}", f"must be >= 0, got {value}")
        _need(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"{key}.capacity_factor",
            f"must be positive (null: dropless), got {self.capacity_factor}",
        )

    def _validate_shared(self, key: str) -> None:
        _need(self.shared_experts >= 0, f"{key}.shared_experts", f"must be >= 0, got {self.shared_experts}")
        _need(
            self.shared_ffn_hidden_size is None or self.shared_experts > 0,
            f"{key}.shared_ffn_hidden_size",
            "sizes the shared experts, and model.moe.shared_experts is 0; set both or neither",
        )
        _need(
            self.shared_ffn_hidden_size is None or self.shared_ffn_hidden_size > 0,
            f"{key}.shared_ffn_hidden_size",
            f"must be positive, got {self.shared_ffn_hidden_size}",
        )
        _need(
            not self.shared_expert_gate or self.shared_experts > 0,
            f"{key}.shared_expert_gate",
            "gates the shared experts, and model.moe.shared_experts is 0",
        )


def check_moe_layout(config: RunConfig) -> None:
    """What parallel.* can do with MoE layers so far: tensor parallelism splits every expert like
    the dense MLP; context parallelism routes each rank's tokens and takes the micro-batch's
    statistics over its group (pretrain/models/moe.py); ZeRO-3 is refused, saying why."""
    moe, p = config.model.moe, config.parallel
    expert = getattr(p, "expert", 1)
    _need(
        moe is not None or expert == 1,
        "parallel.expert",
        f"{expert} needs model.moe (expert parallelism splits the experts of MoE layers); set "
        "model.moe.num_experts or parallel.expert=1",
    )
    if moe is None:
        return
    if expert > 1:
        _check_expert_parallel(config, expert)
    for name, width in (
        ("ffn_hidden_size", moe.expert_ffn(config.model)),
        ("shared_experts", moe.shared_ffn(config.model)),
    ):
        _need(
            width % p.tensor == 0,
            "parallel.tensor",
            f"the MoE width {width} (model.moe.{name}) is not divisible by parallel.tensor={p.tensor}",
        )
    _need(
        p.zero_stage != 3,
        "parallel.zero_stage",
        "3 with model.moe is not supported: ZeRO-3 gathers a module's weights when its own forward "
        "runs, and the MoE layer reads all its experts' weights in one grouped matmul; use "
        "parallel.zero_stage=1 or 2",
    )


def _check_expert_parallel(config: RunConfig, expert: int) -> None:
    """What expert parallelism needs of the model and the strategy (its fit with the
    data-parallel size is checked with the world size, in validate_layout)."""
    moe, p = config.model.moe, config.parallel
    _need(
        moe.num_experts % expert == 0,
        "parallel.expert",
        f"{expert} does not divide model.moe.num_experts={moe.num_experts}: every EP rank holds the "
        "same number of experts",
    )
    # ZeRO-1/2 keep the experts in DeepSpeed's expert parameter groups (pretrain/parallel/
    # zero_experts.py); its ZeRO-3 has no such groups for a model's own MoE layers.
    _need(
        p.zero_stage != 3,
        "parallel.zero_stage",
        f"3 with parallel.expert={expert} is not supported: DeepSpeed's ZeRO-3 partitions expert "
        "weights over the ranks holding the same experts only for its AutoEP layers (its replacements "
        "of Hugging Face MoE modules) and refuses other MoE layers (deepspeed/runtime/engine.py, "
        "_validate_zero3_moe_compatibility: 'Native DeepSpeed MoE is not supported with ZeRO Stage "
        "3'), so it would partition and average each EP rank's different experts over all "
        "data-parallel ranks; use parallel.zero_stage=1 or 2 with expert parallelism",
    )
