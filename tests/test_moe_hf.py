"""Mixture-of-experts models in and out of Hugging Face format (issue 19): a tiny Mixtral and a
tiny Qwen2-MoE, each built and saved by transformers itself, imported at TP 2 x PP 2 (experts
split over the tensor-parallel ranks), compared with transformers' logits and exported back
bit-exact; our own MoE models exported, loaded by transformers, same logits; settings no
transformers family holds are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from hf_helpers import QUIET, assert_same_tensors, max_logit_diff, perturbed  # noqa: E402

from pretrain.checkpoint import load_model, save_checkpoint  # noqa: E402
from pretrain.config import config_from_dict  # noqa: E402
from pretrain.hf import HFConversionError, export_checkpoint, import_checkpoint, model_fields_from_hf  # noqa: E402
from pretrain.models.gpt import GPT  # noqa: E402

SIZES = {
    "vocab_size": 1001,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "num_experts_per_tok": 2,
}


def mixtral() -> transformers.MixtralForCausalLM:
    config = transformers.MixtralConfig(**SIZES, intermediate_size=48, num_hidden_layers=2, num_local_experts=4)
    return perturbed(transformers.MixtralForCausalLM(config))


def qwen2_moe() -> transformers.Qwen2MoeForCausalLM:
    config = transformers.Qwen2MoeConfig(
        **SIZES,
        intermediate_size=96,  # the dense blocks' MLP (blocks 0 and 2)
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_hidden_layers=4,
        num_experts=4,
        decoder_sparse_step=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    return perturbed(transformers.Qwen2MoeForCausalLM(config))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_transformers_model_round_trip(family, tmp_path):
    theirs = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}[family]()
    theirs.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", ["parallel.tensor=2", "parallel.pipeline=2"], **QUIET)
    meta = json.loads((tmp_path / "ckpt/step_0/meta.json").read_text())
    assert (meta["layout"]["tensor"], meta["layout"]["pipeline"]) == (2, 2)
    ours, config = load_model(tmp_path / "ckpt")
    moe = config.model.moe
    if family == "mixtral":
        assert (moe.num_experts, moe.top_k, moe.ffn_hidden_size, moe.shared_experts) == (4, 2, 48, 0)
        assert moe.normalize_top_k and moe.layer_interval == 1
    else:
        assert (moe.layer_interval, moe.shared_ffn_hidden_size, moe.shared_expert_gate) == (2, 80, True)
        assert not moe.normalize_top_k and config.model.qkv_bias and config.model.ffn_size == 96
    diff = max_logit_diff(ours, theirs)
    print(f"{family}: import at TP2 x PP2, max |logit diff| {diff:.3g}")
    assert diff <= 1e-5
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", **QUIET)
    assert_same_tensors(tmp_path / "hf/model.safetensors", tmp_path / "out/model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert type(reloaded) is type(theirs)
    assert max_logit_diff(ours, reloaded) <= 1e-5


OURS = {
    "mixtral": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 48},
    "qwen2_moe": {
        "num_experts": 6,
        "top_k": 3,
        "ffn_hidden_size": 32,
        "layer_interval": 2,
        "shared_experts": 2,
        "shared_ffn_hidden_size": 24,
        "shared_expert_gate": True,
        "normalize_top_k": False,
    },
}


def our_checkpoint(tmp_path: Path, moe: dict, **model) -> Path:
    fields = {"flavour": "llama", "num_layers": 4, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}
    fields |= {"vocab_size": 1001, "seq_length": 64, "rope_theta": 5e5, "moe": moe, **model}
    config = config_from_dict({"model": fields})
    gpt = GPT(config.model, init_seed=5)
    save_checkpoint(tmp_path / "ckpt", step=1, model=gpt, optimizer=None, config=config, train_state={})
    return tmp_path / "ckpt"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_our_model_exported_loads_in_transformers(family, tmp_path):
    ckpt = our_checkpoint(tmp_path, OURS[family], qkv_bias=family == "qwen2_moe")
    export_checkpoint(ckpt, tmp_path / "hf", **QUIET)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(theirs).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[family]
    ours, _ = load_model(ckpt)
    diff = max_logit_diff(ours.eval(), theirs)
    print(f"{family}: our model exported, max |logit diff| {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "moe,model,message",
    [
        ({"router": "sigmoid"}, {}, "sigmoid router is DeepSeek-V3's"),
        ({"shared_experts": 1}, {}, "shared experts without model.moe.shared_expert_gate"),
        ({"layer_interval": 2}, {}, "MixtralForCausalLM has a MoE in every block"),
        ({}, {"flavour": "gpt2", "num_kv_heads": 4}, "there is no GPT-2 MoE"),
    ],
)
def test_export_refuses_what_no_family_holds(moe, model, message, tmp_path):
    ckpt = our_checkpoint(tmp_path, {"num_experts": 4, "ffn_hidden_size": 32, **moe}, **model)
    with pytest.raises(HFConversionError, match=message):
        export_checkpoint(ckpt, tmp_path / "hf", **QUIET)
    assert not (tmp_path / "hf/model.safetensors").exists()


def test_import_refuses_qwen2_moe_exceptions():
    config = qwen2_moe().config.to_dict()
    config["mlp_only_layers"] = [1]
    with pytest.raises(HFConversionError, match="mlp_only_layers"):
        model_fields_from_hf(config)
