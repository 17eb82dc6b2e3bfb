"""Hugging Face conversion: our checkpoints <-> transformers' LlamaForCausalLM / GPT2LMHeadModel.

Export (`tools/convert_to_hf.py`): read a checkpoint of any layout (pretrain/checkpoint/reader.py
merges the TP/PP shards), map the single-device state dict to the transformers names, and write
`config.json`, `generation_config.json`, `model.safetensors` and the tokenizer, so that
`from_pretrained(dir)` works offline and gives our logits.

Import (`tools/convert_from_hf.py`): read a local HF directory (safetensors only), build our run
config from its `config.json`, map the weights to our names and write step_0 of a checkpoint at
any TP/PP layout with the same writer the offline resharder uses.

The weight mapping is a pair of pure functions over state dicts per flavour (`*_to_hf`,
`*_from_hf`); everything else here is files. Facts of our model the mapping relies on
(pretrain/models/gpt.py):
  - the fused QKV rows are grouped per key/value head: for each kv head [its q heads, k, v];
  - SwiGLU's fc1 holds [gate; up];
  - RoPE is the rotate-half convention transformers' Llama uses, so q/k rows are not permuted;
  - the GPT-2 MLP is tanh-GeLU ("gelu_new");
  - the vocabulary tensors have `vocab_rows` rows (padded for TP); HF gets the real `vocab_size`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from pretrain.config import ConfigError, ModelConfig, RunConfig, config_from_dict
from pretrain.models.layers import ShardSpec, shard_tensor

# The vocabulary tensors, as in pretrain/checkpoint/reader.py: padded to vocab_rows in our
# checkpoints, exactly vocab_size rows in Hugging Face's.
VOCAB_PARAMS = ("embed.weight", "head.weight")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}

# transformers' names for the tanh approximation of GeLU our GPT-2 MLP uses.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

Log = Callable[[str], None]


class HFConversionError(ValueError):
    """A model, directory or setting the conversion cannot handle; the message says which."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ================================================================================================
# Configs


def hf_config(model: ModelConfig, *, bos: Optional[int], eos: Optional[int], pad: Optional[int]) -> dict:
    """config.json for our model. Written as a plain dict, not through transformers' config
    classes, so the file carries the keys both transformers 4.x (`rope_theta`) and 5.x
    (`rope_parameters`) read, whatever version runs the export."""
    common = {"vocab_size": model.vocab_size, "tie_word_embeddings": model.tied, "initializer_range": model.init_std,
              "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "use_cache": True,
              "torch_dtype": "float32", "dtype": "float32"}
    try:
        import transformers

        common["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    if model.flavour == "llama":
        return {"architectures": [ARCHITECTURES["llama"]], "model_type": "llama",
                "hidden_size": model.hidden_size, "intermediate_size": model.ffn_size,
                "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
                "num_key_value_heads": model.kv_heads, "head_dim": model.head_dim, "hidden_act": "silu",
                "max_position_embeddings": model.positions, "rms_norm_eps": model.norm_eps,
                "rope_theta": model.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
                "attention_bias": False, "mlp_bias": False, "attention_dropout": model.dropout,
                "pretraining_tp": 1, **common}
    if model.flavour == "gpt2":
        return {"architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2",
                "n_embd": model.hidden_size, "n_layer": model.num_layers, "n_head": model.num_heads,
                "n_positions": model.positions, "n_ctx": model.positions, "n_inner": model.ffn_size,
                "activation_function": "gelu_new", "layer_norm_epsilon": model.norm_eps,
                "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": model.dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, **common}
    raise HFConversionError(f"model.flavour={model.flavour!r}: no Hugging Face export for this flavour "
                            f"(supported: {', '.join(ARCHITECTURES)})")


def _require(config: dict, key: str, ok: Callable[[object], bool], why: str) -> None:
    if key in config and not ok(config[key]):
        raise HFConversionError(f"config.json: {key}={json.dumps(config[key])} is not supported: {why}")


def _flavour_of(config: dict) -> str:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for flavour, arch in ARCHITECTURES.items():
        if model_type == flavour or arch in archs:
            if archs and arch not in archs:
                raise HFConversionError(f"config.json: architectures={archs}: only {arch} is supported for "
                                        f"model_type {flavour!r} (a causal LM head)")
            return flavour
    raise HFConversionError(f"config.json: model_type={model_type!r}, architectures={archs}: supported are "
                            f"{', '.join(f'{a} (model_type {f})' for f, a in ARCHITECTURES.items())}")


def model_fields_from_hf(config: dict) -> dict:
    """Our model.* settings from a transformers config.json; a feature our GPT lacks fails
    naming its config key (loading it anyway would give a different function)."""
    flavour = _flavour_of(config)
    try:
        return _llama_fields(config) if flavour == "llama" else _gpt2_fields(config)
    except KeyError as e:
        raise HFConversionError(f"config.json lacks {e} (needed for a {ARCHITECTURES[flavour]})") from None


def _llama_fields(c: dict) -> dict:
    _require(c, "hidden_act", lambda v: v in ("silu", "swish"), "our Llama MLP is SwiGLU (silu)")
    _require(c, "attention_bias", lambda v: not v, "our Llama attention has no biases")
    _require(c, "mlp_bias", lambda v: not v, "our Llama MLP has no biases")
    _require(c, "rope_scaling", lambda v: v is None, "our RoPE has no scaling (plain rope_theta only)")
    _require(c, "sliding_window", lambda v: v is None, "our attention is full causal attention")
    rope = c.get("rope_parameters") or {}
    _require(rope, "rope_type", lambda v: v in (None, "default"),
             "our RoPE has no scaling (config.json rope_parameters.rope_type must be 'default')")
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    _require(c, "head_dim", lambda v: v is None or v * heads == hidden,
             f"our head dimension is hidden_size / num_attention_heads = {hidden}/{heads}")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    return {"flavour": "llama", "num_layers": c["num_hidden_layers"], "hidden_size": hidden, "num_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads") or heads, "ffn_hidden_size": c["intermediate_size"],
            "vocab_size": c["vocab_size"], "max_position_embeddings": c.get("max_position_embeddings", 2048),
            "norm_eps": c.get("rms_norm_eps", 1e-6), "rope_theta": float(theta),
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
            "dropout": float(c.get("attention_dropout", 0.0)), "init_std": c.get("initializer_range", 0.02)}


def _gpt2_fields(c: dict) -> dict:
    _require(c, "activation_function", lambda v: v in TANH_GELU,
             f"our GPT-2 MLP is tanh-GeLU (one of {', '.join(TANH_GELU)})")
    _require(c, "scale_attn_weights", lambda v: v, "our attention scales scores by 1/sqrt(head_dim)")
    _require(c, "scale_attn_by_inverse_layer_idx", lambda v: not v, "our attention has no per-layer scaling")
    _require(c, "add_cross_attention", lambda v: not v, "our GPT is decoder-only, without cross-attention")
    # One dropout rate in our model for embeddings, attention and residuals: a training setting
    # (model.dropout=... overrides it), so differing HF rates are merged, not refused.
    rates = {float(c.get(k, 0.1)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(rates) > 1:
        _warn(f"config.json has different dropout rates {sorted(rates)}; using model.dropout={max(rates)}")
    return {"flavour": "gpt2", "num_layers": c["n_layer"], "hidden_size": c["n_embd"], "num_heads": c["n_head"],
            "ffn_hidden_size": c.get("n_inner") or 4 * c["n_embd"], "vocab_size": c["vocab_size"],
            "max_position_embeddings": c.get("n_positions", 1024), "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": bool(c.get("tie_word_embeddings", True)), "dropout": max(rates),
            "init_std": c.get("initializer_range", 0.02)}


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


def llama_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our single-device llama state dict (vocabulary rows already cut to vocab_size) -> the
    LlamaForCausalLM state dict."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["final_norm.weight"]}
    if not model.tied:
        out["lm_head.weight"] = state["head.weight"]
    ffn = model.ffn_size
    for i in range(model.num_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[ours + "attn.qkv.weight"], model)
        fc1 = state[ours + "mlp.fc1.weight"]  # [gate; up]
        out.update({
            hf + "input_layernorm.weight": state[ours + "norm1.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
            hf + "mlp.gate_proj.weight": fc1[:ffn], hf + "mlp.up_proj.weight": fc1[ffn:],
            hf + "mlp.down_proj.weight": state[ours + "mlp.fc2.weight"],
        })
    return out


def llama_from_hf(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict (prefix `model.`) -> ours (vocabulary rows as in HF)."""
    out = {"embed.weight": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    if not model.tied:
        out["head.weight"] = hf["lm_head.weight"]
    for i in range(model.num_layers):
        ours, p = f"blocks.{i}.", f"model.layers.{i}."
        out.update({
            ours + "norm1.weight": hf[p + "input_layernorm.weight"],
            ours + "norm2.weight": hf[p + "post_attention_layernorm.weight"],
            ours + "attn.qkv.weight": fuse_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                                               hf[p + "self_attn.v_proj.weight"], model),
            ours + "attn.proj.weight": hf[p + "self_attn.o_proj.weight"],
            ours + "mlp.fc1.weight": torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
            ours + "mlp.fc2.weight": hf[p + "mlp.down_proj.weight"],
        })
    return out


def gpt2_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our gpt2 state dict -> GPT2LMHeadModel's. HF GPT-2 uses Conv1D, whose weight is
    [in, out]: the transpose of nn.Linear's. Its c_attn is [all Q; all K; all V] on the output
    side, where ours interleaves per head."""
    t = lambda w: w.t()  # noqa: E731
    out = {"transformer.wte.weight": state["embed.weight"], "transformer.wpe.weight": state["pos_embed.weight"],
           "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
    if not model.tied:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(model.num_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        qkv_w = torch.cat(split_qkv(state[ours + "attn.qkv.weight"], model))
        qkv_b = torch.cat(split_qkv(state[ours + "attn.qkv.bias"], model))
        out.update({
            hf + "ln_1.weight": state[ours + "norm1.weight"], hf + "ln_1.bias": state[ours + "norm1.bias"],
            hf + "ln_2.weight": state[ours + "norm2.weight"], hf + "ln_2.bias": state[ours + "norm2.bias"],
            hf + "attn.c_attn.weight": t(qkv_w), hf + "attn.c_attn.bias": qkv_b,
            hf + "attn.c_proj.weight": t(state[ours + "attn.proj.weight"]),
            hf + "attn.c_proj.bias": state[ours + "attn.proj.bias"],
            hf + "mlp.c_fc.weight": t(state[ours + "mlp.fc1.weight"]),
            hf + "mlp.c_fc.bias": state[ours + "mlp.fc1.bias"],
            hf + "mlp.c_proj.weight": t(state[ours + "mlp.fc2.weight"]),
            hf + "mlp.c_proj.bias": state[ours + "mlp.fc2.bias"],
        })
    return out


def gpt2_from_hf(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (prefix `transformer.`) -> ours (vocabulary rows as in HF)."""
    t = lambda w: w.t()  # noqa: E731
    d = model.hidden_size
    out = {"embed.weight": hf["transformer.wte.weight"], "pos_embed.weight": hf["transformer.wpe.weight"],
           "final_norm.weight": hf["transformer.ln_f.weight"], "final_norm.bias": hf["transformer.ln_f.bias"]}
    if not model.tied:
        out["head.weight"] = hf["lm_head.weight"]
    for i in range(model.num_layers):
        ours, p = f"blocks.{i}.", f"transformer.h.{i}."
        qkv_w, qkv_b = t(hf[p + "attn.c_attn.weight"]), hf[p + "attn.c_attn.bias"]  # [3d, d], [3d]
        out.update({
            ours + "norm1.weight": hf[p + "ln_1.weight"], ours + "norm1.bias": hf[p + "ln_1.bias"],
            ours + "norm2.weight": hf[p + "ln_2.weight"], ours + "norm2.bias": hf[p + "ln_2.bias"],
            ours + "attn.qkv.weight": fuse_qkv(*qkv_w.split(d), model),
            ours + "attn.qkv.bias": fuse_qkv(*qkv_b.split(d), model),
            ours + "attn.proj.weight": t(hf[p + "attn.c_proj.weight"]),
            ours + "attn.proj.bias": hf[p + "attn.c_proj.bias"],
            ours + "mlp.fc1.weight": t(hf[p + "mlp.c_fc.weight"]), ours + "mlp.fc1.bias": hf[p + "mlp.c_fc.bias"],
            ours + "mlp.fc2.weight": t(hf[p + "mlp.c_proj.weight"]), ours + "mlp.fc2.bias": hf[p + "mlp.c_proj.bias"],
        })
    return out


_TO_HF = {"llama": llama_to_hf, "gpt2": gpt2_to_hf}
_FROM_HF = {"llama": llama_from_hf, "gpt2": gpt2_from_hf}


def to_hf_state_dict(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our single-device state dict (vocabulary padded to any number of rows) -> the transformers
    one: padding rows dropped, every tensor contiguous and owning its memory (safetensors
    refuses views that share storage)."""
    if model.flavour not in _TO_HF:
        hf_config(model, bos=None, eos=None, pad=None)  # raises, naming the flavour
    if model.bidirectional:
        raise HFConversionError("model.bidirectional=true: a masked-LM model is not a causal LM; there is no "
                                "LlamaForCausalLM/GPT2LMHeadModel equivalent")
    state = {n: (t[: model.vocab_size] if n in VOCAB_PARAMS else t) for n, t in state.items()}
    # One copy each: slices of one tensor (gate/up of fc1) would otherwise share storage.
    return {n: t.detach().clone(memory_format=torch.contiguous_format)
            for n, t in _TO_HF[model.flavour](state, model).items()}


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
            raise HFConversionError(f"the Hugging Face weights lack '{key}' (a different architecture, or "
                                    "an incomplete download)")

        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

    try:
        ours = _FROM_HF[model.flavour](Recorder(hf), model)
    except RuntimeError as e:  # a reshape of a tensor whose size config.json did not predict
        raise HFConversionError(f"the Hugging Face weights do not fit the sizes config.json gives: {e}") from None
    unused = sorted(set(hf) - used)
    if unused:
        raise HFConversionError(f"the Hugging Face weights hold tensors this model has no place for "
                                f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): an architecture "
                                "feature config.json did not announce")
    out = {}
    for name, tensor in ours.items():
        tensor = tensor.detach().to(torch.float32).contiguous()
        if name in VOCAB_PARAMS:
            tensor = _pad_rows(tensor, model.vocab_rows)
        out[name] = tensor
    return out


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero padding rows: they take no part in the loss and never get a gradient."""
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def model_params(model: ModelConfig) -> dict[str, tuple[Optional[ShardSpec], list[int]]]:
    """name -> (TP shard spec, full shape with padded vocabulary rows) of our single-device GPT,
    read off the model itself (every sharded parameter carries `tp_spec`, at TP=1 too). Built on
    the meta device with the random init skipped: nothing is allocated, so this costs the same
    for a 13B model as for a tiny one."""
    from pretrain.models.gpt import GPT

    class Uninitialized(GPT):
        def reset_parameters(self, seed=None) -> None:  # the init draws on real devices only
            pass

    with torch.device("meta"):
        gpt = Uninitialized(model)
    return {n: (getattr(p, "tp_spec", None), list(p.shape)) for n, p in gpt.named_parameters()}


def check_shapes(state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Every tensor has the name and shape our model gives it: a config.json that disagrees with
    its weights fails here, naming the tensor, rather than somewhere inside a later load."""
    expected = {n: shape for n, (_, shape) in model_params(model).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise HFConversionError(f"the converted weights do not fit the model config.json describes (missing "
                                f"{missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in state.items():
        if list(tensor.shape) != expected[name]:
            raise HFConversionError(f"weight {name}: shape {list(tensor.shape)} does not match the model "
                                    f"config.json describes (expected {expected[name]})")


# ================================================================================================
# Files


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model directory: model.safetensors, or the shards a
    model.safetensors.index.json names. Pickled weights (.bin, .pt) are refused: unpickling a
    downloaded file can run arbitrary code."""
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFConversionError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
        if pickles:
            raise HFConversionError(
                f"{hf_dir} holds only pickled PyTorch weights ({', '.join(pickles[:3])}), which are not read "
                "here because unpickling a file can run arbitrary code; convert them to safetensors first "
                "where you trust them (e.g. model.save_pretrained(dir, safe_serialization=True))")
        raise HFConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(load_file(str(path)))
    return weights


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{hf_dir} is not a Hugging Face model directory: no config.json in it")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFConversionError(f"{path} is unreadable: {e}") from None


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise HFConversionError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise HFConversionError(f"--output {output} exists and is not empty; choose another directory or pass "
                                "--force to overwrite")


# ================================================================================================
# Tokenizer


# Files a Hugging Face tokenizer may consist of; replaced as a set on export, so a stale one
# from an earlier export cannot change how the new directory loads.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "added_tokens.json", "vocab.json", "merges.txt")


def _special_ids(tokenizer) -> dict:
    bos = getattr(tokenizer, "bos", None)
    return {"bos": bos if bos is not None and bos >= 0 else None, "eos": tokenizer.eod, "pad": tokenizer.pad}


def export_tokenizer(path: str, output: Path, *, max_length: int) -> dict:
    """Write the tokenizer our run used as a transformers fast tokenizer (tokenizer.json +
    tokenizer_config.json) that encodes text to the ids our tokenizer gives; returns its
    bos/eos/pad ids. Checked on a few probe strings before returning."""
    from pretrain.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

    ours = load_tokenizer(path)
    for name in _HF_TOKENIZER_FILES:
        (output / name).unlink(missing_ok=True)
    if isinstance(ours, SentencePieceTokenizer):
        _export_sentencepiece(ours, output, max_length=max_length)
    elif isinstance(ours, HFTokenizer):
        _export_tokenizer_json(ours, output, max_length=max_length)
    else:  # pragma: no cover - load_tokenizer returns one of the two
        raise HFConversionError(f"{path}: no Hugging Face export for tokenizer type {type(ours).__name__}")
    _verify_tokenizer(ours, output)
    return _special_ids(ours)


def _export_sentencepiece(ours, output: Path, *, max_length: int) -> None:
    """transformers converts a sentencepiece model to a `tokenizers` BPE/Unigram pipeline that
    follows the model's own normalizer spec (identity normalization, no dummy prefix, byte
    fallback: what tools/train_tokenizer.py trains). The class-specific tokenizers
    (LlamaTokenizer) rebuild that pipeline with Llama's own rules (a "▁" prepended to the text)
    and give other ids, so the generic fast tokenizer is used and saved as tokenizer.json.
    Special pieces typed in the text ("<s>") are plain text to sentencepiece's encode; the fast
    tokenizer matches them as special tokens unless split_special_tokens is set."""
    from transformers import PreTrainedTokenizerFast

    sp = ours._sp
    pieces = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id(),
              "pad_token": sp.pad_id(), "mask_token": ours.mask}
    specials = {k: sp.id_to_piece(i) for k, i in pieces.items() if i is not None and i >= 0}
    settings = {**specials, "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
                "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(ours.path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings))
        fast = PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
        converted = json.loads(fast.backend_tokenizer.to_str())
    if converted["model"]["type"] == "Unigram":
        _unreachable_special_pieces(converted, sp)
    (output / "tokenizer.json").write_text(json.dumps(converted, ensure_ascii=False), encoding="utf-8")
    # The .model file too, for tools that read sentencepiece directly (and for convert_from_hf,
    # which then trains on the very same tokenizer); tokenizer.json wins in transformers.
    shutil.copyfile(ours.path, output / "tokenizer.model")
    _write_tokenizer_config(output, {**settings, "tokenizer_class": "PreTrainedTokenizerFast"})


# Far below any sum of real piece scores over a few characters.
_UNREACHABLE_SCORE = -1e6


def _unreachable_special_pieces(tokenizer_json: dict, sp) -> None:
    """sentencepiece's unigram search only ever matches normal (and user-defined) pieces, so a
    text that spells "</s>" or "<0x41>" is encoded character by character; the `tokenizers`
    Unigram model searches its whole vocabulary and would pick the control, unknown and byte
    pieces as one token. Their scores are pushed out of reach (unknown characters still map to
    unk and byte fallback through the model's own rule, not through these scores). BPE needs no
    such care: no merge produces those pieces."""
    vocab = tokenizer_json["model"]["vocab"]  # [[piece, score], ...] in id order
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            vocab[i][1] = _UNREACHABLE_SCORE


def _export_tokenizer_json(ours, output: Path, *, max_length: int) -> None:
    """A tokenizer.json we trained with is copied with its post-processor removed: we encode
    with add_special_tokens=False (preprocessing appends the end-of-document token itself), so
    the model never saw the BOS a post-processor would add, and transformers' default
    encode(text) must not add it either."""
    tok = json.loads(Path(ours.path).read_text(encoding="utf-8"))
    tok["post_processor"] = None
    (output / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    settings = {"eos_token": ours._tok.id_to_token(ours.eod), "pad_token": ours._tok.id_to_token(ours.pad),
                "clean_up_tokenization_spaces": False, "model_max_length": max_length,
                "tokenizer_class": "PreTrainedTokenizerFast"}
    if ours.mask is not None:
        settings["mask_token"] = ours._tok.id_to_token(ours.mask)
    _write_tokenizer_config(output, settings)


def _write_tokenizer_config(output: Path, settings: dict) -> None:
    (output / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


# Code-like probes with the cases that tell tokenizers apart: indentation runs, digits, a
# leading space, tabs and newlines, non-ASCII (byte fallback), a special piece typed as text.
TOKENIZER_PROBES = ("def main(argv=None):\n    return 0\n", "  x = [1, 22, 333]\t# é 中 😀\n\n",
                    "class A:\n\tpass</s><s>", " leading space and trailing ")


def _verify_tokenizer(ours, output: Path) -> None:
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(output), local_files_only=True)
    except Exception as e:  # transformers' own failure, named
        _warn(f"the exported tokenizer does not load with transformers' AutoTokenizer: {e}")
        return
    for text in TOKENIZER_PROBES:
        if theirs.encode(text) != ours.encode(text):
            _warn(f"the exported tokenizer encodes {text!r} differently from ours "
                  f"({theirs.encode(text)[:8]} vs {ours.encode(text)[:8]}); check it before use")
            return


def import_tokenizer(hf_dir: Path, output: Path) -> Optional[Path]:
    """Copy the HF directory's tokenizer where our run config can name it; returns the file
    data.tokenizer should point at, or None. A sentencepiece tokenizer.model wins when it loads
    (it is the original of a sentencepiece-based tokenizer.json); else tokenizer.json with its
    tokenizer_config.json (which names the end-of-document token)."""
    from pretrain.data.tokenizer import load_tokenizer

    target = output / "tokenizer"
    if (hf_dir / "tokenizer.model").is_file():
        try:
            load_tokenizer(str(hf_dir / "tokenizer.model"))
        except ValueError:
            pass  # e.g. a tiktoken file under that name: use tokenizer.json
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hf_dir / "tokenizer.model", target / "tokenizer.model")
            return (target / "tokenizer.model").resolve()
    if (hf_dir / "tokenizer.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, target / name)
        try:
            load_tokenizer(str(target / "tokenizer.json"))
        except ValueError as e:
            _warn(f"{hf_dir}/tokenizer.json cannot serve as data.tokenizer ({e}); set data.tokenizer yourself")
            return None
        return (target / "tokenizer.json").resolve()
    return None


# ================================================================================================
# The two conversions


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, force: bool = False,
                      log: Log = print) -> Path:
    """Write the checkpoint (root with `latest`, or step_N; any TP/PP layout) as a transformers
    model directory; returns it."""
    from safetensors.torch import save_file

    from pretrain.checkpoint import SavedCheckpoint

    output = Path(output)
    saved = SavedCheckpoint(checkpoint)
    model = saved.config.model
    _check_output(output, force)
    hf_state = to_hf_state_dict({name: saved.full(name) for name in saved.names}, model)
    output.mkdir(parents=True, exist_ok=True)
    # Stale weights of an earlier export (--force) would be loaded alongside the new ones.
    for stale in [*output.glob("model*.safetensors"), output / "model.safetensors.index.json",
                  *output.glob("pytorch_model*.bin")]:
        stale.unlink(missing_ok=True)
    save_file(hf_state, str(output / "model.safetensors"), metadata={"format": "pt"})

    ids = {"bos": None, "eos": None, "pad": None}
    tokenizer = saved.config.data.tokenizer
    if tokenizer and Path(tokenizer).exists():
        try:
            ids = export_tokenizer(tokenizer, output, max_length=model.positions)
        except (ValueError, ImportError, OSError) as e:  # the weights are still worth having
            _warn(f"tokenizer {tokenizer} was not exported: {e}")
    else:
        _warn(f"tokenizer {tokenizer!r} (data.tokenizer of {saved.dir}/config.yaml) not found: the model is "
              "exported without a tokenizer and without bos/eos/pad ids")
    config = hf_config(model, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"])
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_generation_config(output, ids)
    log(f"exported {saved.dir} (step {saved.meta['step']}, layout tp={saved.tp} pp={saved.pp}) as "
        f"{config['architectures'][0]} to {output}")
    return output


def _write_generation_config(output: Path, ids: dict) -> None:
    try:
        from transformers import GenerationConfig
    except ImportError:  # the weights and config.json are still useful; say what is missing
        _warn("transformers is not installed: no generation_config.json written (pip install 'pretrain[hf]')")
        return
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(
        str(output))


class HFSource:
    """Imported weights in the shape `pretrain.checkpoint.write_layout` reads a checkpoint:
    full tensors by our names, sliced per TP rank on request. No optimizer state."""

    has_optimizer = False

    def __init__(self, state: dict[str, torch.Tensor], model: ModelConfig) -> None:
        self.tensors = state
        skeleton = model_params(model)
        self.names = sorted(state)
        self.specs = {n: skeleton[n][0] for n in self.names}
        self.shapes = {n: list(t.shape) for n, t in state.items()}

    def optimizer_keys(self, name: str) -> list[str]:
        return []

    def shard(self, name: str, key: Optional[str] = None, *, tp_rank: int, tp_size: int,
              rows: Optional[int] = None) -> torch.Tensor:
        from pretrain.checkpoint.reader import fit_rows

        assert key is None, "imported checkpoints hold no optimizer state"
        full = self.tensors[name]
        if name in VOCAB_PARAMS and rows is not None:
            full = fit_rows(full, rows)
        spec = self.specs[name]
        if spec is None:
            return full
        return shard_tensor(full, spec, rank=tp_rank, size=tp_size).contiguous()


# Model settings that decide the weights: an override may not change them.
_WEIGHT_FIELDS = ("flavour", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size", "vocab_size",
                  "tied", "positions", "norm_eps", "rope_theta")


def import_config(hf: dict, overrides: list[str], *, tokenizer: Optional[Path]) -> RunConfig:
    """Our run config for an HF config.json: model.* from it (padded_vocab_size unset, so it
    pads to 128 x parallel.tensor), data.tokenizer the copied tokenizer, then the overrides
    (layout, training settings). Overrides that would change the weights' shapes are refused."""
    from pretrain.parallel.topology import validate_layout

    fields = model_fields_from_hf(hf)
    fields["seq_length"] = fields["max_position_embeddings"]
    raw = {"model": fields, "data": {"tokenizer": str(tokenizer) if tokenizer else ""}}
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise HFConversionError(f"{bad[0]!r}: overrides are key=value, e.g. parallel.tensor=2")
    try:
        reference = config_from_dict(raw).model
        config = config_from_dict(raw, overrides)
        validate_layout(config, config.parallel.tensor * config.parallel.pipeline)  # as reshard_checkpoint does
    except ConfigError as e:
        raise HFConversionError(str(e)) from None
    changed = [f for f in _WEIGHT_FIELDS if getattr(config.model, f) != getattr(reference, f)]
    if changed:
        raise HFConversionError(f"model.{changed[0]}: the override changes what the Hugging Face weights "
                                f"fix ({getattr(reference, changed[0])} in config.json); only layout and "
                                "training settings can be overridden")
    return config


def import_checkpoint(hf_dir: str | Path, output: str | Path, overrides: list[str] = (), *, force: bool = False,
                      log: Log = print) -> Path:
    """Write a local transformers LlamaForCausalLM / GPT2LMHeadModel directory as step_0 of a
    checkpoint under `output`, at the layout the overrides choose; returns the step directory."""
    from pretrain.checkpoint import write_layout

    hf_dir, output = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise HFConversionError(f"--input {hf_dir} is not a directory")
    hf = read_hf_config(hf_dir)
    # Everything that can fail is checked before anything is written under `output`.
    config = import_config(hf, list(overrides), tokenizer=None)
    _check_output(output, force)
    state = from_hf_state_dict(read_hf_weights(hf_dir), config.model)
    check_shapes(state, config.model)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = import_tokenizer(hf_dir, output)
    if tokenizer is None:
        _warn(f"{hf_dir} has no tokenizer.json or tokenizer.model: data.tokenizer is left empty")
    config = import_config(hf, list(overrides), tokenizer=tokenizer)
    step_dir = write_layout(HFSource(state, config.model), config, output, step=0,
                            train_state={"consumed_samples": 0}, data_parallel=1)
    p = config.parallel
    log(f"imported {hf_dir} ({(hf.get('architectures') or [hf.get('model_type')])[0]}) as {step_dir} at layout "
        f"tp={p.tensor} pp={p.pipeline}; train on it with: python -m pretrain.train {step_dir}/config.yaml "
        f"data.path=... checkpoint.resume={step_dir}")
    return step_dir


def cli_error(message: str) -> int:
    """The tools' way to report a user mistake: `error: ...` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


__all__ = ["HFConversionError", "HFSource", "check_shapes", "export_checkpoint", "export_tokenizer",
           "from_hf_state_dict", "fuse_qkv", "gpt2_from_hf", "gpt2_to_hf", "hf_config", "import_checkpoint",
           "import_config", "import_tokenizer", "llama_from_hf", "llama_to_hf", "model_fields_from_hf", "model_params",
           "normalize_hf_names", "read_hf_weights", "split_qkv", "to_hf_state_dict"]
