"""RoPE settings in config.json, both ways. transformers 4.x spells them `rope_theta` plus
`rope_scaling` (null, or a dict with `rope_type`, once `type`); 5.x one dict `rope_parameters`
(`rope_type`, `rope_theta` and the scaling's own keys). Both spellings are read, and both are
written, so an export loads in either version. Only plain RoPE (`default`) and Llama 3.1's
scaling (`llama3`, model.rope_scaling) exist in our model; other types are refused."""

from __future__ import annotations

import json

from pretrain.config import ModelConfig

# RopeScaling's fields, under the same names in config.json.
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SUPPORTED = ("default", "llama3")


def rope_fields_from_hf(c: dict, *, error: type[Exception]) -> dict:
    """model.rope_theta and model.rope_scaling (a dict of RopeScaling's fields, or None) from a
    transformers config.json; an unsupported setting raises `error` naming its key."""
    where, params = _rope_dict(c, error)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED:
        raise error(
            f"config.json: {where}.rope_type={json.dumps(rope_type)} is not supported: our RoPE has "
            f"plain frequencies ('default') or Llama 3.1's scaling ('llama3'); other schemes (linear, "
            "dynamic NTK, YaRN, LongRoPE) would compute different positions"
        )
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise error(f"config.json: partial_rotary_factor={partial} is not supported: our RoPE rotates the whole head")
    theta = float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    # transformers falls back to max_position_embeddings for a missing original length.
    params = {"original_max_position_embeddings": c.get("max_position_embeddings"), **params}
    missing = [k for k in LLAMA3_KEYS if params.get(k) is None]
    if missing:
        raise error(f"config.json: {where} with rope_type 'llama3' lacks {', '.join(missing)}")
    scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_KEYS}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _rope_dict(c: dict, error: type[Exception]) -> tuple[str, dict]:
    """(its key, the dict) transformers takes the RoPE settings from: a non-empty `rope_scaling`
    wins over `rope_parameters`, as transformers 5 reads them."""
    for key in ("rope_scaling", "rope_parameters"):
        value = c.get(key)
        if not value:
            continue
        if not isinstance(value, dict) or any(isinstance(v, dict) for v in value.values()):
            raise error(
                f"config.json: {key}={json.dumps(value)} is not supported: expected one dict of RoPE "
                "settings (per-layer-type RoPE is not in our model)"
            )
        return key, value
    return "rope_parameters", {}


def rope_to_hf(model: ModelConfig) -> dict:
    """config.json's RoPE keys for our model, in both transformers' spellings."""
    theta, scaling = model.rope_theta, model.rope_scaling
    if scaling is None:
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    fields = {"rope_type": "llama3", **{k: getattr(scaling, k) for k in LLAMA3_KEYS}}
    return {"rope_theta": theta, "rope_scaling": fields, "rope_parameters": {**fields, "rope_theta": theta}}
