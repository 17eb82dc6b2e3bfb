"""Long-context models in and out of Hugging Face format (issue 18): Llama 3's rope scaling
(model.rope_scaling) and the Qwen2 family (model.qkv_bias). Each model is built and saved by
transformers itself, imported at TP=2 x PP=2, compared with transformers' logits, and exported
back bit-exact; the scaled RoPE frequencies are transformers' own; a llama with both options
trains at TP (+SP) and TP x PP exactly as on one process; bad settings fail naming the key."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_helpers import QUIET, assert_same_tensors, max_logit_diff, perturbed  # noqa: E402

from pretrain.checkpoint import load_model, reshard_checkpoint  # noqa: E402
from pretrain.config import ConfigError, config_from_dict  # noqa: E402
from pretrain.config.model import RopeScaling  # noqa: E402
from pretrain.hf import HFConversionError, export_checkpoint, import_checkpoint, model_fields_from_hf  # noqa: E402
from pretrain.models.gpt import GPT  # noqa: E402
from pretrain.models.rope import rope_inv_freq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TP2_PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]

# head_dim 16, theta 1e4: rotation wavelengths 6.3, 20, 63, 199, 628, ... positions. Against an
# original context of 256 (low 1, high 4) the first three are kept (< 64), the fourth is blended
# (64..256) and the last four are slowed 8x (> 256): every branch of the rule is exercised.
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
SIZES = {
    "vocab_size": 1001,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
}


def llama3_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**SIZES, max_position_embeddings=1024, rope_parameters=dict(LLAMA3))
    return perturbed(transformers.LlamaForCausalLM(config))


def qwen2_model(tied: bool) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        **SIZES,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=tied,
    )
    return perturbed(transformers.Qwen2ForCausalLM(config))


def round_trip(model, tmp_path: Path):
    """save_pretrained -> import at TP2 x PP2 -> (our model, its config) and the export back."""
    model.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", TP2_PP2, **QUIET)
    meta = json.loads((tmp_path / "ckpt/step_0/meta.json").read_text())
    assert (meta["layout"]["tensor"], meta["layout"]["pipeline"]) == (2, 2)
    ours, config = load_model(tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", **QUIET)
    return ours, config, tmp_path / "out"


def test_llama3_rope_scaling_round_trip(tmp_path):
    theirs = llama3_model()
    ours, config, out = round_trip(theirs, tmp_path)
    assert config.model.rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
    )
    diff = max_logit_diff(ours, theirs)
    print(f"llama3 rope scaling: import max |logit diff| {diff:.3g}")
    assert diff <= 1e-5
    # The scaling matters here: the same weights with plain RoPE are far off.
    plain = GPT(dataclasses.replace(config.model, rope_scaling=None), init_seed=0)
    plain.load_state_dict(ours.state_dict())
    assert max_logit_diff(plain.eval(), theirs) > 1e-3

    assert_same_tensors(tmp_path / "hf/model.safetensors", out / "model.safetensors")
    written = json.loads((out / "config.json").read_text())
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert written["rope_scaling"] == scaling  # transformers 4.x
    assert written["rope_parameters"] == LLAMA3 and written["rope_theta"] == 10000.0  # 5.x
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert reloaded.config.rope_parameters == theirs.config.rope_parameters
    assert max_logit_diff(ours, reloaded) <= 1e-5


def test_legacy_rope_scaling_key_imports(llama_hf_config):
    """A transformers 4.x config.json (Llama 3.1's own): top-level rope_theta, `rope_scaling`."""
    config = {
        **llama_hf_config,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    fields = model_fields_from_hf(config)
    assert fields["rope_theta"] == 500000.0 and fields["rope_scaling"]["factor"] == 8.0
    assert fields["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert model_fields_from_hf({**config, "rope_scaling": None})["rope_scaling"] is None


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_round_trip(tied, tmp_path):
    theirs = qwen2_model(tied)
    assert theirs.model.layers[0].self_attn.q_proj.bias is not None
    ours, config, out = round_trip(theirs, tmp_path)
    assert config.model.qkv_bias and config.model.tied == tied and config.model.rope_theta == 1e6
    assert ours.blocks["0"].attn.qkv.bias is not None and ours.blocks["0"].attn.proj.bias is None
    diff = max_logit_diff(ours, theirs)
    print(f"qwen2 ({'tied' if tied else 'untied'}): import max |logit diff| {diff:.3g}")
    assert diff <= 1e-5

    assert_same_tensors(tmp_path / "hf/model.safetensors", out / "model.safetensors")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["model_type"] == "qwen2"
    assert written["tie_word_embeddings"] == tied and written["use_sliding_window"] is False
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert max_logit_diff(ours, reloaded.eval()) <= 1e-5
    if not tied:  # the Q/K/V bias is resharded like its weight: another layout exports the same bytes
        resharded = reshard_checkpoint(tmp_path / "ckpt", tmp_path / "tp1pp2", ["parallel.pipeline=2"])
        export_checkpoint(resharded, tmp_path / "out2", **QUIET)
        assert_same_tensors(out / "model.safetensors", tmp_path / "out2/model.safetensors")


def test_scaled_rope_frequencies_are_transformers(tmp_path):
    theirs = llama3_model()
    inv_freq = theirs.model.rotary_emb.inv_freq  # transformers computes them in fp32
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256)
    ours = rope_inv_freq(head_dim=16, theta=10000.0, scaling=scaling)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), inv_freq, rtol=5e-7, atol=0)  # a few fp32 roundings
    plain = rope_inv_freq(head_dim=16, theta=10000.0)
    kept, slowed = ours == plain, torch.isclose(ours, plain / 8, rtol=1e-12, atol=0)
    assert kept.sum() == 3 and slowed.sum() == 4  # and one blended between the two
    # The model's tables are built from them.
    model = GPT(config_from_dict({"model": _llama_model({"rope_scaling": dataclasses.asdict(scaling)})}).model)
    angles = torch.outer(torch.arange(1024, dtype=torch.float64), ours)
    torch.testing.assert_close(model.rope_cos[:, :8], angles.cos().float(), rtol=0, atol=0)


def _llama_model(extra: dict) -> dict:
    return {
        "flavour": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "seq_length": 1024,
        "vocab_size": 100,
        **extra,
    }


@pytest.mark.parametrize(
    "scaling, key",
    [
        ({"factor": 0.5}, "model.rope_scaling.factor: must be >= 1"),
        ({"low_freq_factor": 0}, "model.rope_scaling.low_freq_factor: must be positive"),
        ({"high_freq_factor": 1.0}, "model.rope_scaling.high_freq_factor: must be greater than"),
        ({"original_max_position_embeddings": 0}, "model.rope_scaling.original_max_position_embeddings"),
        ({"rope_type": "yarn"}, "model.rope_scaling.rope_type: 'yarn' is not one of 'llama3'"),
        ({"beta_fast": 32}, "model.rope_scaling.beta_fast: unknown key"),
    ],
)
def test_rope_scaling_config_errors(scaling, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"model": _llama_model({"rope_scaling": scaling})})


def test_rope_scaling_and_qkv_bias_need_the_llama_flavour():
    gpt2 = {"num_layers": 2, "hidden_size": 64, "num_heads": 4}
    with pytest.raises(ConfigError, match="model.rope_scaling: scales RoPE, which only model.flavour=llama"):
        config_from_dict({"model": {**gpt2, "rope_scaling": {"factor": 2}}})
    with pytest.raises(ConfigError, match="model.qkv_bias: is a llama-flavour option"):
        config_from_dict({"model": {**gpt2, "qkv_bias": True}})
    # Overrides reach the sub-section by key, and null turns it off.
    base = {"model": _llama_model({})}
    config = config_from_dict(
        base, ["model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=64"]
    )
    assert config.model.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=64)
    assert config_from_dict(base, ["model.rope_scaling=null"]).model.rope_scaling is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {**LLAMA3, "rope_type": "yarn"}}, 'rope_parameters.rope_type="yarn" is not supported'),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, 'rope_scaling.rope_type="linear" is not supported'),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'default'.*'llama3'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor, high_freq_factor"),
        ({"rope_parameters": {"full_attention": dict(LLAMA3)}}, "per-layer-type RoPE"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"attention_bias": True}, "attention_bias.*o_proj"),
    ],
)
def test_unsupported_hf_rope_and_bias_settings_name_the_key(change, message, llama_hf_config):
    with pytest.raises(HFConversionError, match=message):
        model_fields_from_hf({**llama_hf_config, **change})


def test_hf_llama3_scaling_out_of_range_is_refused_by_the_config(tmp_path, capsys, llama_hf_config):
    """Values transformers only warns about fail at import, naming our key, with exit code 2."""
    hf = tmp_path / "hf"
    hf.mkdir()
    bad = {**LLAMA3, "high_freq_factor": 0.5}
    (hf / "config.json").write_text(json.dumps({**llama_hf_config, "rope_parameters": bad}))
    spec = importlib.util.spec_from_file_location("convert_from_hf", ROOT / "tools/convert_from_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", str(hf), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.rope_scaling.high_freq_factor" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, key",
    [({"use_sliding_window": True}, "use_sliding_window"), ({"hidden_act": "gelu"}, "hidden_act")],
)
def test_unsupported_qwen2_settings_name_the_key(change, key, llama_hf_config):
    config = {**llama_hf_config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096}
    assert model_fields_from_hf(config)["qkv_bias"] is True  # a window that is not used is fine
    with pytest.raises(HFConversionError, match=key):
        model_fields_from_hf({**config, **change})
    layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(HFConversionError, match="layer_types"):
        model_fields_from_hf({**config, "layer_types": layer_types})


LONG = ["model.flavour=llama", "model.num_kv_heads=2", "model.qkv_bias=true"]
LONG += ["model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=8"]


@pytest.mark.parametrize(
    "layout, world",
    [(["parallel.tensor=2", "parallel.sequence_parallel=true"], 2), (TP2_PP2, 4)],
    ids=["tp2_sp", "tp2_pp2"],
)
def test_qkv_bias_and_rope_scaling_train_like_one_process(layout, world):
    """Three optimizer steps: the Q/K/V bias's shards (and gradients) line up with the weight's."""
    from parallel_harness import run_layout

    reference = run_layout(LONG, world=1)
    got = run_layout(LONG + layout, world=world)
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["grad_norm"], reference["grad_norm"], rtol=0, atol=2e-5)


def test_llama_8b_128k_config_loads():
    from pretrain.config import load_config, validate_layout

    config = load_config(ROOT / "configs/llama_8b_128k.yaml")
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.kv_heads, m.ffn_size) == (32, 4096, 32, 8, 14336)
    assert (m.vocab_size, m.seq_length, m.rope_theta) == (128256, 131072, 500000.0)
    assert m.rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    assert config.parallel.tensor == 8 and config.parallel.sequence_parallel
    validate_layout(config, 64)
