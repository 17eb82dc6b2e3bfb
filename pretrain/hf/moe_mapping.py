"""Mixture-of-experts models <-> Hugging Face: MixtralForCausalLM and Qwen2MoeForCausalLM.

Both are our llama flavour with model.moe (pretrain/models/moe.py) and a softmax router:
  - Mixtral: every block a MoE, top-k weights renormalised, no shared experts, no Q/K/V biases;
    saved (transformers 4.x and 5.x alike) as `block_sparse_moe.gate.weight` and
    `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate, up, down).
  - Qwen2-MoE: every decoder_sparse_step-th block a MoE (our model.moe.layer_interval), one
    shared expert gated by sigmoid(x . w) (our shared experts as one MLP, shared_expert_gate),
    norm_topk_prob (our normalize_top_k), Q/K/V biases (qkv_bias); `mlp.gate.weight`,
    `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, `mlp.shared_expert.*`,
    `mlp.shared_expert_gate.weight`.
Our expert e's fc1 is [gate; up] (SwiGLU), fc2 the down projection. DeepSeek-V3's sigmoid router
has no transformers family we can hold (its attention is multi-head latent attention).

Hugging Face's router loss pools all layers into one Switch loss that is top_k times ours per
layer (pretrain/models/moe_routing.py); router_aux_loss_coef is converted as
ours = hf x top_k / MoE layers, so the two weigh the balance alike.
"""

from __future__ import annotations

import json

import torch

from pretrain.config import ModelConfig
from pretrain.hf.errors import HFConversionError, _warn

MOE_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def moe_model_type(model: ModelConfig) -> str:
    """The transformers family our MoE model exports as, or an error saying what none has."""
    moe = model.moe
    why = None
    if model.flavour != "llama":
        why = "the Hugging Face MoE families are Llama-like (model.flavour=llama); there is no GPT-2 MoE"
    elif moe.router != "softmax":
        why = (
            "the sigmoid router is DeepSeek-V3's, whose transformers model also needs multi-head latent "
            "attention, which our model does not have"
        )
    elif moe.shared_experts and not moe.shared_expert_gate:
        why = "shared experts without model.moe.shared_expert_gate have no transformers family (Qwen2-MoE gates them)"
    if why:
        raise HFConversionError(f"model.moe: no Hugging Face export: {why}")
    if moe.shared_experts:
        return "qwen2_moe"
    if moe.layer_interval != 1 or not moe.normalize_top_k or model.qkv_bias:
        raise HFConversionError(
            "model.moe: no Hugging Face export: MixtralForCausalLM has a MoE in every block "
            "(layer_interval=1), renormalised top-k weights (normalize_top_k=true) and no Q/K/V "
            "biases; Qwen2MoeForCausalLM, which has the other settings, needs shared experts with "
            "model.moe.shared_expert_gate=true"
        )
    return "mixtral"


def _hf_aux_coef(model: ModelConfig) -> float:
    moe = model.moe
    return moe.aux_coeff * len(moe.layer_ids(model.num_layers)) / moe.top_k


def moe_settings(model: ModelConfig, model_type: str) -> dict:
    """The config.json keys of the MoE part (after the decoder's own)."""
    moe = model.moe
    if moe.capacity_factor is not None:
        _warn(
            f"model.moe.capacity_factor={moe.capacity_factor}: transformers' {MOE_ARCHITECTURES[model_type]} is "
            "dropless, so the exported model drops no tokens where ours would"
        )
    common = {
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": _hf_aux_coef(model),
        "output_router_logits": False,
    }
    if model_type == "mixtral":
        return {
            **common,
            "num_local_experts": moe.num_experts,
            "intermediate_size": moe.expert_ffn(model),
            "router_jitter_noise": 0.0,
        }
    return {
        **common,
        "num_experts": moe.num_experts,
        "moe_intermediate_size": moe.expert_ffn(model),
        "shared_expert_intermediate_size": moe.shared_ffn(model),
        "norm_topk_prob": moe.normalize_top_k,
        "decoder_sparse_step": moe.layer_interval,
        "mlp_only_layers": [],
        "qkv_bias": model.qkv_bias,
    }


def moe_fields(c: dict, model_type: str) -> dict:
    """Our model.* settings of the MoE part from config.json (model.moe as a dict)."""
    if c.get("router_jitter_noise"):
        _warn(f"config.json: router_jitter_noise={c['router_jitter_noise']}: our router has no jitter; ignored")
    top_k = c["num_experts_per_tok"]
    if model_type == "mixtral":
        moe = {"num_experts": c["num_local_experts"], "ffn_hidden_size": c["intermediate_size"]}
        extra: dict = {}
    else:
        if c.get("mlp_only_layers"):
            raise HFConversionError(
                f"config.json: mlp_only_layers={json.dumps(c['mlp_only_layers'])} is not supported: our MoE "
                "blocks are every decoder_sparse_step-th block, with no exceptions"
            )
        shared = c.get("shared_expert_intermediate_size") or 0
        if shared <= 0:
            raise HFConversionError(f"config.json: shared_expert_intermediate_size={shared}: expected a positive width")
        moe = {
            "num_experts": c["num_experts"],
            "ffn_hidden_size": c["moe_intermediate_size"],
            "layer_interval": c.get("decoder_sparse_step", 1),
            "shared_experts": 1,
            "shared_ffn_hidden_size": shared,
            "shared_expert_gate": True,
            "normalize_top_k": bool(c.get("norm_topk_prob", False)),
        }
        extra = {"qkv_bias": bool(c.get("qkv_bias", True))}
    layers = c["num_hidden_layers"] // moe.get("layer_interval", 1)  # blocks N-1, 2N-1, ...
    coef = c.get("router_aux_loss_coef")
    if coef is not None and layers:
        moe["aux_loss_coeff"] = coef * top_k / layers
    return {**extra, "moe": {**moe, "top_k": top_k, "router": "softmax"}}


# Per family: (block prefix of the MoE MLP, router name, expert weight names for gate/up/down).
_NAMES = {
    "mixtral": ("block_sparse_moe", "gate.weight", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
}


def moe_to_hf(state: dict[str, torch.Tensor], model: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """The MoE blocks' tensors of our single-device state dict under transformers' names."""
    moe, out = model.moe, {}
    prefix, router, (gate, up, down) = _NAMES[model_type]
    for i in moe.layer_ids(model.num_layers):
        ours, hf = f"blocks.{i}.mlp.", f"model.layers.{i}.{prefix}."
        out[hf + router] = state[ours + "router.weight"]
        for e in range(moe.num_experts):
            fc1 = state[ours + f"experts.{e}.fc1.weight"]  # [gate; up]
            half = fc1.shape[0] // 2
            out[hf + f"experts.{e}.{gate}.weight"] = fc1[:half]
            out[hf + f"experts.{e}.{up}.weight"] = fc1[half:]
            out[hf + f"experts.{e}.{down}.weight"] = state[ours + f"experts.{e}.fc2.weight"]
        if moe.shared_experts:
            fc1 = state[ours + "shared.fc1.weight"]
            half = fc1.shape[0] // 2
            out[hf + f"shared_expert.{gate}.weight"] = fc1[:half]
            out[hf + f"shared_expert.{up}.weight"] = fc1[half:]
            out[hf + f"shared_expert.{down}.weight"] = state[ours + "shared.fc2.weight"]
            out[hf + "shared_expert_gate.weight"] = state[ours + "shared_gate.weight"]
    return out


def moe_from_hf(hf: dict[str, torch.Tensor], model: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Inverse of moe_to_hf (`hf` may record which names are read)."""
    moe, out = model.moe, {}
    prefix, router, (gate, up, down) = _NAMES[model_type]
    for i in moe.layer_ids(model.num_layers):
        ours, p = f"blocks.{i}.mlp.", f"model.layers.{i}.{prefix}."
        out[ours + "router.weight"] = hf[p + router]
        for e in range(moe.num_experts):
            q = p + f"experts.{e}."
            out[ours + f"experts.{e}.fc1.weight"] = torch.cat([hf[q + f"{gate}.weight"], hf[q + f"{up}.weight"]])
            out[ours + f"experts.{e}.fc2.weight"] = hf[q + f"{down}.weight"]
        if moe.shared_experts:
            q = p + "shared_expert."
            out[ours + "shared.fc1.weight"] = torch.cat([hf[q + f"{gate}.weight"], hf[q + f"{up}.weight"]])
            out[ours + "shared.fc2.weight"] = hf[q + f"{down}.weight"]
            out[ours + "shared_gate.weight"] = hf[p + "shared_expert_gate.weight"]
    return out
