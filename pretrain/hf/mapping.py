"""Hugging Face <-> pretrain: config fields and the weight mapping (pure functions over state dicts)."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

# The vocabulary tensors: padded to vocab_rows in our checkpoints, exactly vocab_size rows in
# Hugging Face's.
from pretrain.checkpoint.reader import VOCAB_PARAMS, fit_rows
from pretrain.config import ModelConfig
from pretrain.hf.errors import HFConversionError, _warn
from pretrain.hf.moe_mapping import MOE_ARCHITECTURES, moe_fields, moe_from_hf, moe_model_type, moe_settings, moe_to_hf
from pretrain.hf.rope import rope_fields_from_hf, rope_to_hf
from pretrain.models.sharding import ShardSpec, sharding

# Hugging Face model_type -> its causal-LM architecture. Qwen2 is our llama flavour with
# model.qkv_bias (biases on Q/K/V only): the rest of its decoder is Llama's.
# Mixtral and Qwen2-MoE are our llama with model.moe (pretrain/hf/moe_mapping.py).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    **MOE_ARCHITECTURES,
}
FLAVOURS = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2", "mixtral": "llama", "qwen2_moe": "llama"}

# transformers' names for the tanh approximation of GeLU our GPT-2 MLP uses.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

Log = Callable[[str], None]


# ================================================================================================
# Configs


# The sizes both flavours carry, under their own config.json names:
# our ModelConfig attribute -> (Llama's and Qwen2's key, GPT-2's key).
_SIZE_KEYS = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_layers": ("num_hidden_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_head"),
    "ffn_size": ("intermediate_size", "n_inner"),
    "positions": ("max_position_embeddings", "n_positions"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon"),
}


def hf_model_type(model: ModelConfig) -> str:
    """The transformers model_type our model exports as: a llama with Q/K/V biases is a Qwen2."""
    if model.flavour not in set(FLAVOURS.values()):
        raise HFConversionError(
            f"model.flavour={model.flavour!r}: no Hugging Face export for this flavour "
            f"(supported: {', '.join(sorted(set(FLAVOURS.values())))})"
        )
    if model.moe is not None:
        return moe_model_type(model)
    return "qwen2" if model.flavour == "llama" and model.qkv_bias else model.flavour


def hf_config(model: ModelConfig, *, bos: int | None, eos: int | None, pad: int | None) -> dict:
    """config.json for our model. Written as a plain dict, not through transformers' config
    classes, so the file carries the keys both transformers 4.x (`rope_theta`, `rope_scaling`)
    and 5.x (`rope_parameters`) read, whatever version runs the export."""
    model_type = hf_model_type(model)
    column = 1 if model.flavour == "gpt2" else 0
    settings = {
        "llama": _llama_settings,
        "qwen2": _qwen2_settings,
        "gpt2": _gpt2_settings,
        "mixtral": lambda m: {**_mixtral_settings(m), **moe_settings(m, "mixtral")},
        "qwen2_moe": lambda m: {**_qwen2_settings(m), **moe_settings(m, "qwen2_moe")},
    }[model_type]
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        **{keys[column]: getattr(model, attribute) for attribute, keys in _SIZE_KEYS.items()},
        **settings(model),
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": model.tied,
        "initializer_range": model.init_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        **_writer_version(),
    }


def _llama_settings(model: ModelConfig) -> dict:
    """What our Llama fixes that transformers' LlamaConfig leaves open."""
    fixed = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    return {
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "attention_dropout": model.dropout,
        **rope_to_hf(model),
        **fixed,
    }


def _qwen2_settings(model: ModelConfig) -> dict:
    """What our llama with Q/K/V biases fixes that transformers' Qwen2Config leaves open: full
    attention in every layer (no sliding window). Qwen2 has no head_dim key: it is always
    hidden_size / num_attention_heads, as ours is."""
    return {
        "num_key_value_heads": model.kv_heads,
        "attention_dropout": model.dropout,
        **rope_to_hf(model),
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model.num_layers,
        "layer_types": ["full_attention"] * model.num_layers,
    }


def _mixtral_settings(model: ModelConfig) -> dict:
    """Mixtral's decoder: Llama's without the bias switches, full attention (no sliding window)."""
    return {
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "attention_dropout": model.dropout,
        **rope_to_hf(model),
        "hidden_act": "silu",
        "sliding_window": None,
    }


def _gpt2_settings(model: ModelConfig) -> dict:
    """What our GPT-2 fixes that transformers' GPT2Config leaves open: one dropout rate, the
    tanh GeLU, attention scaled by 1/sqrt(head_dim) only."""
    dropouts = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), model.dropout)
    fixed = {"activation_function": "gelu_new", "scale_attn_weights": True}
    fixed |= dict.fromkeys(("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"), False)
    return {"n_ctx": model.positions, **dropouts, **fixed}


def _writer_version() -> dict:
    try:
        import transformers
    except ImportError:
        return {}
    return {"transformers_version": transformers.__version__}


def _require(config: dict, key: str, ok: Callable[[object], bool], why: str) -> None:
    if key in config and not ok(config[key]):
        raise HFConversionError(f"config.json: {key}={json.dumps(config[key])} is not supported: {why}")


def _model_type_of(config: dict) -> str:
    """The supported transformers model_type config.json describes (one of ARCHITECTURES)."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for known, arch in ARCHITECTURES.items():
        if model_type == known or arch in archs:
            if archs and arch not in archs:
                raise HFConversionError(
                    f"config.json: architectures={archs}: only {arch} is supported for "
                    f"model_type {known!r} (a causal LM head)"
                )
            return known
    raise HFConversionError(
        f"config.json: model_type={model_type!r}, architectures={archs}: supported are "
        f"{', '.join(f'{a} (model_type {f})' for f, a in ARCHITECTURES.items())}"
    )


def model_fields_from_hf(config: dict) -> dict:
    """Our model.* settings from a transformers config.json; a feature our GPT lacks fails
    naming its config key (loading it anyway would give a different function)."""
    model_type = _model_type_of(config)
    fields = {
        "llama": _llama_fields,
        "qwen2": _qwen2_fields,
        "gpt2": _gpt2_fields,
        "mixtral": lambda c: {**_llama_fields(c), **moe_fields(c, "mixtral")},
        "qwen2_moe": lambda c: {**_qwen2_fields(c), **moe_fields(c, "qwen2_moe")},
    }[model_type]
    try:
        return fields(config)
    except KeyError as e:
        raise HFConversionError(f"config.json lacks {e} (needed for a {ARCHITECTURES[model_type]})") from None


def _llama_fields(c: dict) -> dict:
    _require(
        c,
        "attention_bias",
        lambda v: not v,
        "it puts biases on o_proj too; our llama has them on Q/K/V at most (Qwen2's layout)",
    )
    _require(c, "mlp_bias", lambda v: not v, "our Llama MLP has no biases")
    _require(c, "sliding_window", lambda v: v is None, "our attention is full causal attention")
    return _decoder_fields(c, default_positions=2048)


def _qwen2_fields(c: dict) -> dict:
    """Qwen2: Llama's decoder with biases on Q/K/V; sliding-window layers only when
    use_sliding_window is set (then refused), whatever sliding_window holds."""
    _require(c, "use_sliding_window", lambda v: not v, "our attention is full causal attention in every layer")
    _require(
        c,
        "layer_types",
        lambda v: v is None or set(v) <= {"full_attention"},
        "our attention is full causal attention in every layer",
    )
    return {**_decoder_fields(c, default_positions=32768), "qkv_bias": True}


def _decoder_fields(c: dict, *, default_positions: int) -> dict:
    """The model.* settings Llama and Qwen2 spell alike."""
    _require(c, "hidden_act", lambda v: v in ("silu", "swish"), "our Llama MLP is SwiGLU (silu)")
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    _require(
        c,
        "head_dim",
        lambda v: v is None or v * heads == hidden,
        f"our head dimension is hidden_size / num_attention_heads = {hidden}/{heads}",
    )
    return {
        "flavour": "llama",
        "num_layers": c["num_hidden_layers"],
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": c.get("num_key_value_heads") or heads,
        "ffn_hidden_size": c["intermediate_size"],
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": c.get("max_position_embeddings", default_positions),
        "norm_eps": c.get("rms_norm_eps", 1e-6),
        **rope_fields_from_hf(c, error=HFConversionError),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "dropout": float(c.get("attention_dropout", 0.0)),
        "init_std": c.get("initializer_range", 0.02),
    }


def _gpt2_fields(c: dict) -> dict:
    _require(
        c,
        "activation_function",
        lambda v: v in TANH_GELU,
        f"our GPT-2 MLP is tanh-GeLU (one of {', '.join(TANH_GELU)})",
    )
    _require(c, "scale_attn_weights", lambda v: v, "our attention scales scores by 1/sqrt(head_dim)")
    _require(c, "scale_attn_by_inverse_layer_idx", lambda v: not v, "our attention has no per-layer scaling")
    _require(c, "add_cross_attention", lambda v: not v, "our GPT is decoder-only, without cross-attention")
    # One dropout rate in our model for embeddings, attention and residuals: a training setting
    # (model.dropout=... overrides it), so differing HF rates are merged, not refused.
    rates = {float(c.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(rates) > 1:
        _warn(f"config.json has different dropout rates {sorted(rates)}; using model.dropout={max(rates)}")
    return {
        "flavour": "gpt2",
        "num_layers": c["n_layer"],
        "hidden_size": c["n_embd"],
        "num_heads": c["n_head"],
        "ffn_hidden_size": c.get("n_inner") or 4 * c["n_embd"],
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": c.get("n_positions", 1024),
        "norm_eps": c.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
        "dropout": max(rates),
        "init_std": c.get("initializer_range", 0.02),
    }


# ================================================================================================
# Weights: pure functions over state dicts


def split_qkv(fused: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused QKV rows [kv head g: (q heads of g, k_g, v_g)] -> (all q, all k, all v) rows.
    Query head j of group g is head g * group + j, the kv head transformers' GQA pairs it with."""
    kv, group, d = model.kv_heads, model.num_heads // model.kv_heads, model.head_dim
    rest = fused.shape[1:]  # (in_features,) for the weight, () for the bias
    grouped = fused.reshape(kv, group + 2, d, *rest)
    q = grouped[:, :group].reshape(model.num_heads * d, *rest)
    k = grouped[:, group].reshape(kv * d, *rest)
    v = grouped[:, group + 1].reshape(kv * d, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of split_qkv."""
    kv, group, d = model.kv_heads, model.num_heads // model.kv_heads, model.head_dim
    rest = q.shape[1:]
    parts = [q.reshape(kv, group, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# The tensors that map one to one, as (ours, Hugging Face's, transposed): the model-level ones,
# then each block's (under the prefixes blocks.{i}. and _BLOCK_PREFIX.{i}.). HF GPT-2 uses
# Conv1D, whose weight is [in, out]: the transpose of nn.Linear's.
_RENAMES = {
    "llama": (
        [("embed.weight", "model.embed_tokens.weight", False), ("final_norm.weight", "model.norm.weight", False)],
        [
            ("norm1.weight", "input_layernorm.weight", False),
            ("norm2.weight", "post_attention_layernorm.weight", False),
            ("attn.proj.weight", "self_attn.o_proj.weight", False),
            ("mlp.fc2.weight", "mlp.down_proj.weight", False),
        ],
    ),
    "gpt2": (
        [
            ("embed.weight", "transformer.wte.weight", False),
            ("pos_embed.weight", "transformer.wpe.weight", False),
            ("final_norm.weight", "transformer.ln_f.weight", False),
            ("final_norm.bias", "transformer.ln_f.bias", False),
        ],
        [
            ("norm1.weight", "ln_1.weight", False),
            ("norm1.bias", "ln_1.bias", False),
            ("norm2.weight", "ln_2.weight", False),
            ("norm2.bias", "ln_2.bias", False),
            ("attn.proj.weight", "attn.c_proj.weight", True),
            ("attn.proj.bias", "attn.c_proj.bias", False),
            ("mlp.fc1.weight", "mlp.c_fc.weight", True),
            ("mlp.fc1.bias", "mlp.c_fc.bias", False),
            ("mlp.fc2.weight", "mlp.c_proj.weight", True),
            ("mlp.fc2.bias", "mlp.c_proj.bias", False),
        ],
    ),
}
_BLOCK_PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}


def _renamed(src: dict[str, torch.Tensor], model: ModelConfig, *, to_hf: bool) -> dict[str, torch.Tensor]:
    """The one-to-one tensors of `src` (ours when to_hf, else Hugging Face's) under the other side's names."""
    top, block = _RENAMES[model.flavour]
    pairs = top + ([] if model.tied else [("head.weight", "lm_head.weight", False)])
    for i in range(model.num_layers):
        own = [b for b in block if not (_is_moe_block(model, i) and b[0].startswith("mlp."))]
        pairs += [(f"blocks.{i}.{o}", f"{_BLOCK_PREFIX[model.flavour]}.{i}.{h}", t) for o, h, t in own]
    out = {}
    for ours, hf, transposed in pairs:
        x = src[ours if to_hf else hf]
        out[hf if to_hf else ours] = x.t() if transposed else x
    return out


def _is_moe_block(model: ModelConfig, layer: int) -> bool:
    """Block `layer` has a MoE in place of its MLP (mapped by pretrain/hf/moe_mapping.py)."""
    return model.moe is not None and model.moe.is_moe_layer(layer)


def llama_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our single-device llama state dict (vocabulary rows already cut to vocab_size) -> the
    LlamaForCausalLM state dict (Qwen2ForCausalLM's, Q/K/V biases included, with model.qkv_bias)."""
    out = _renamed(state, model, to_hf=True)
    ffn = model.ffn_size
    for i in range(model.num_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[ours + "attn.qkv.weight"], model)
        out.update(
            {hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v}
        )
        if not _is_moe_block(model, i):
            fc1 = state[ours + "mlp.fc1.weight"]  # [gate; up]
            out.update({hf + "mlp.gate_proj.weight": fc1[:ffn], hf + "mlp.up_proj.weight": fc1[ffn:]})
        if model.qkv_bias:
            biases = split_qkv(state[ours + "attn.qkv.bias"], model)
            out.update({hf + f"self_attn.{x}_proj.bias": b for x, b in zip("qkv", biases)})
    if model.moe is not None:
        out.update(moe_to_hf(state, model, hf_model_type(model)))
    return out


def llama_from_hf(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / Qwen2ForCausalLM state dict (prefix `model.`) -> ours (vocabulary
    rows as in HF)."""
    out = _renamed(hf, model, to_hf=False)
    for i in range(model.num_layers):
        ours, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        out[ours + "attn.qkv.weight"] = fuse_qkv(q, k, v, model)
        if model.qkv_bias:
            out[ours + "attn.qkv.bias"] = fuse_qkv(*(hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"), model)
        if not _is_moe_block(model, i):
            out[ours + "mlp.fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    if model.moe is not None:
        out.update(moe_from_hf(hf, model, hf_model_type(model)))
    return out


def gpt2_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our gpt2 state dict -> GPT2LMHeadModel's. Its c_attn is [all Q; all K; all V] on the
    output side, where ours interleaves per head."""
    out = _renamed(state, model, to_hf=True)
    for i in range(model.num_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        out[hf + "attn.c_attn.weight"] = torch.cat(split_qkv(state[ours + "attn.qkv.weight"], model)).t()
        out[hf + "attn.c_attn.bias"] = torch.cat(split_qkv(state[ours + "attn.qkv.bias"], model))
    return out


def gpt2_from_hf(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (prefix `transformer.`) -> ours (vocabulary rows as in HF)."""
    out = _renamed(hf, model, to_hf=False)
    d = model.hidden_size
    for i in range(model.num_layers):
        ours, p = f"blocks.{i}.", f"transformer.h.{i}."
        qkv_w, qkv_b = hf[p + "attn.c_attn.weight"].t(), hf[p + "attn.c_attn.bias"]  # [3d, d], [3d]
        out[ours + "attn.qkv.weight"] = fuse_qkv(*qkv_w.split(d), model)
        out[ours + "attn.qkv.bias"] = fuse_qkv(*qkv_b.split(d), model)
    return out


_TO_HF = {"llama": llama_to_hf, "gpt2": gpt2_to_hf}
_FROM_HF = {"llama": llama_from_hf, "gpt2": gpt2_from_hf}


def to_hf_state_dict(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our single-device state dict (vocabulary padded to any number of rows) -> the transformers
    one: padding rows dropped, every tensor contiguous and owning its memory (safetensors
    refuses views that share storage)."""
    hf_model_type(model)  # raises for a flavour (or a MoE) no transformers family holds
    if model.bidirectional:
        raise HFConversionError(
            "model.bidirectional=true: a masked-LM model is not a causal LM; there is no "
            "LlamaForCausalLM/GPT2LMHeadModel equivalent"
        )
    state = {n: (t[: model.vocab_size] if n in VOCAB_PARAMS else t) for n, t in state.items()}
    # One copy each: slices of one tensor (gate/up of fc1) would otherwise share storage.
    return {
        n: t.detach().clone(memory_format=torch.contiguous_format)
        for n, t in _TO_HF[model.flavour](state, model).items()
    }


# Buffers some transformers versions saved with the weights: derived, never learned.
_HF_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def normalize_hf_names(hf: dict[str, torch.Tensor], flavour: str) -> dict[str, torch.Tensor]:
    """Drop saved buffers and give every weight its LMHeadModel name (checkpoints of the bare
    GPT2Model/LlamaModel lack the `transformer.`/`model.` prefix)."""
    prefix = "transformer." if flavour == "gpt2" else "model."
    out = {}
    for name, tensor in hf.items():
        if name.endswith(_HF_BUFFERS):
            continue
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        out[name] = tensor
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers state dict -> our single-device one in fp32 (what our trainer keeps), the
    vocabulary tensors zero-padded to model.vocab_rows. Weights this mapping would not use
    (e.g. biases our Llama lacks) are an error, not silently dropped."""
    hf = normalize_hf_names(hf, model.flavour)
    if model.tied:
        hf.pop("lm_head.weight", None)  # some saves store the tied copy too
    used: set[str] = set()

    class Recorder(dict):  # which HF names the mapping reads, to report unused and missing ones
        def __missing__(self, key):
            raise HFConversionError(
                f"the Hugging Face weights lack '{key}' (a different architecture, or an incomplete download)"
            )

        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    try:
        ours = _FROM_HF[model.flavour](Recorder(hf), model)
    except RuntimeError as e:  # a reshape of a tensor whose size config.json did not predict
        raise HFConversionError(f"the Hugging Face weights do not fit the sizes config.json gives: {e}") from None
    unused = sorted(set(hf) - used)
    if unused:
        raise HFConversionError(
            f"the Hugging Face weights hold tensors this model has no place for "
            f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): an architecture "
            "feature config.json did not announce"
        )
    out = {}
    for name, tensor in ours.items():
        tensor = tensor.detach().to(torch.float32).contiguous()
        if name in VOCAB_PARAMS:
            tensor = fit_rows(tensor, model.vocab_rows)  # zero rows: no part in the loss, no gradient
        out[name] = tensor
    return out


def model_params(model: ModelConfig) -> dict[str, tuple[ShardSpec | None, list[int]]]:
    """name -> (TP shard spec, full shape with padded vocabulary rows) of our single-device GPT,
    read off the model itself (every sharded parameter is marked, at TP=1 too). Built on
    the meta device with the random init skipped: nothing is allocated, so this costs the same
    for a 13B model as for a tiny one."""
    from pretrain.models.gpt import GPT

    class Uninitialized(GPT):
        def reset_parameters(self, seed=None) -> None:  # the init draws on real devices only
            pass

    with torch.device("meta"):
        gpt = Uninitialized(model)
    return {n: (sharding(p).tp, list(p.shape)) for n, p in gpt.named_parameters()}


def check_shapes(state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Every tensor has the name and shape our model gives it: a config.json that disagrees with
    its weights fails here, naming the tensor, rather than somewhere inside a later load."""
    expected = {n: shape for n, (_, shape) in model_params(model).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise HFConversionError(
            f"the converted weights do not fit the model config.json describes (missing "
            f"{missing[:3]}, unexpected {extra[:3]})"
        )
    for name, tensor in state.items():
        if list(tensor.shape) != expected[name]:
            raise HFConversionError(
                f"weight {name}: shape {list(tensor.shape)} does not match the model "
                f"config.json describes (expected {expected[name]})"
            )
