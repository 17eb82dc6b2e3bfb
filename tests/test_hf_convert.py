"""Hugging Face conversion both ways (pretrain/hf.py, tools/convert_to_hf.py, tools/convert_from_hf.py):
exports load offline in transformers and give our logits, greedy samples and token ids; any
parallel layout exports the same bytes; import -> export round-trips bit-exactly; imported
checkpoints load, match transformers' logits and train; mistakes fail with exit status 2."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_helpers import QUIET, assert_same_tensors, max_logit_diff  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from pretrain.checkpoint import load_model, reshard_checkpoint, save_checkpoint  # noqa: E402
from pretrain.config import config_from_dict, load_config  # noqa: E402
from pretrain.data.tokenizer import load_tokenizer  # noqa: E402
from pretrain.generate import generate  # noqa: E402
from pretrain.hf import HFConversionError, export_checkpoint, import_checkpoint, model_fields_from_hf  # noqa: E402
from pretrain.models.gpt import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Grouped-query llama with an odd vocabulary larger than the tokenizer's (2000): the 47 padding
# rows of the 2048-row embedding must be dropped, the one real id beyond the tokenizer kept.
MODELS = {
    "llama": {
        "flavour": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vocab_size": 2001,
        "seq_length": 32,
        "rope_theta": 50000.0,
        "norm_eps": 1e-6,
    },
    "gpt2": {
        "flavour": "gpt2",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 2000,
        "seq_length": 32,
    },
    "llama_tied": {
        "flavour": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 2000,
        "seq_length": 32,
        "tie_embeddings": True,
        "ffn_hidden_size": 96,
    },
}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, *args):
    return subprocess.run(
        [sys.executable, f"tools/{name}.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def make_checkpoint(root, model, tokenizer):
    """A saved tiny model whose weights are its init plus noise (norms and biases included, so
    a mapping that mixed them up could not pass)."""
    config = config_from_dict({"model": model, "data": {"tokenizer": tokenizer}})
    gpt = GPT(config.model, init_seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    save_checkpoint(root, step=1, model=gpt, optimizer=None, config=config, train_state={"consumed_samples": 0})
    return root


@pytest.fixture(scope="module")
def exported(stdlib_data, tmp_path_factory):
    """name -> (checkpoint root, HF export dir); the llama one exported through the CLI."""
    base = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in MODELS.items():
        root = make_checkpoint(base / f"ckpt_{name}", model, stdlib_data["tokenizer"])
        hf_dir = base / f"hf_{name}"
        if name == "llama":
            result = run_tool("convert_to_hf", "--checkpoint", root, "--output", hf_dir)
            assert result.returncode == 0, result.stderr
            assert "warning" not in result.stderr, result.stderr
        else:
            export_checkpoint(root, hf_dir, **QUIET)
        out[name] = (root, hf_dir)
    return out


def hf_model(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_our_logits_and_greedy_samples(name, exported, stdlib_data):
    root, hf_dir = exported[name]
    ours, config = load_model(root)
    m = config.model
    theirs = hf_model(hf_dir)
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[m.flavour]
    c = json.loads((hf_dir / "config.json").read_text())
    assert c["vocab_size"] == m.vocab_size and c["tie_word_embeddings"] == m.tied
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 3)  # the stdlib tokenizer's
    if m.flavour == "llama":
        assert (c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]) == (m.kv_heads, 16, m.ffn_size)
        assert c["rope_theta"] == m.rope_theta and c["rms_norm_eps"] == m.norm_eps
    weights = load_file(hf_dir / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not m.tied)
    diff = max_logit_diff(ours, theirs, vocab_size=m.vocab_size, seq=32)
    print(f"{name}: export max |logit diff| {diff:.3g}")
    assert diff <= 1e-5
    prompt = load_tokenizer(stdlib_data["tokenizer"]).encode("def main(argv):\n    ")
    mine = generate(ours, prompt, max_new_tokens=8, temperature=0, stop_token=2)
    with torch.no_grad():
        hf_ids = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0, len(prompt) :]
    assert hf_ids.tolist() == mine


def test_exported_tokenizer_encodes_like_ours(exported, stdlib_data):
    _, hf_dir = exported["gpt2"]
    ours = load_tokenizer(stdlib_data["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    corpus = Path(stdlib_data["prefix"]).parent / "corpus.jsonl"
    texts = [json.loads(line)["text"][:3000] for line in corpus.read_text().splitlines()[:8]]
    texts += [
        "    if x == 10:\n\t\treturn 'héllo 世界 🐍'\n",
        "  two leading spaces",
        "digits 1234567890",
        "special pieces as text: <s> </s> <pad> <mask> <unk>",
        "",
    ]
    for text in texts:
        assert theirs.encode(text) == ours.encode(text), text[:80]
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 3)


def test_unigram_sentencepiece_tokenizer(stdlib_data, tmp_path):
    """A unigram model (tools/train_tokenizer.py --model-type unigram): pieces that only
    sentencepiece's control/byte rules produce stay unreachable from text in the export too."""
    from pretrain.hf import export_tokenizer

    corpus = Path(stdlib_data["prefix"]).parent / "corpus.jsonl"
    (tmp_path / "small.jsonl").write_text("\n".join(corpus.read_text().splitlines()[:20]) + "\n")
    subprocess.run(
        [
            sys.executable,
            "tools/train_tokenizer.py",
            "--input",
            tmp_path / "small.jsonl",
            "--output",
            tmp_path / "uni",
            "--vocab-size",
            "400",
            "--model-type",
            "unigram",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (tmp_path / "hf").mkdir()
    assert export_tokenizer(str(tmp_path / "uni.model"), tmp_path / "hf", max_length=64) == {
        "bos": 1,
        "eos": 2,
        "pad": 3,
    }
    ours = load_tokenizer(str(tmp_path / "uni.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for text in ["def f(x):\n    return x + 1\n", "x<0x41>y <0x0A>", "a<unk>b </s><s>", "<mask><pad>", "é中😀"]:
        assert theirs.encode(text) == ours.encode(text), text


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_of_any_layout_is_bit_exact(name, exported, tmp_path):
    root, hf_dir = exported[name]
    resharded = reshard_checkpoint(root, tmp_path / "tp2pp2", ["parallel.tensor=2", "parallel.pipeline=2"])
    assert (resharded / "model_tp1_pp1_part0.safetensors").is_file()
    export_checkpoint(resharded, tmp_path / "hf", **QUIET)
    assert_same_tensors(hf_dir / "model.safetensors", tmp_path / "hf/model.safetensors")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_import_then_export_round_trips(name, exported, tmp_path):
    _, hf_dir = exported[name]
    if name == "llama":  # both tools as users run them
        result = run_tool("convert_from_hf", "--input", hf_dir, "--output", tmp_path / "ckpt", "parallel.tensor=2")
        assert result.returncode == 0, result.stderr
        result = run_tool("convert_to_hf", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "hf")
        assert result.returncode == 0, result.stderr
    else:
        import_checkpoint(hf_dir, tmp_path / "ckpt", ["parallel.tensor=2"], **QUIET)
        export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", **QUIET)
    meta = json.loads((tmp_path / "ckpt/step_0/meta.json").read_text())
    assert meta["layout"]["tensor"] == 2 and meta["has_optimizer"] is False
    assert_same_tensors(hf_dir / "model.safetensors", tmp_path / "hf/model.safetensors")
    assert json.loads((hf_dir / "config.json").read_text()) == json.loads((tmp_path / "hf/config.json").read_text())


def test_tokenizer_json_round_trip(exported, tmp_path):
    """An HF directory with only tokenizer.json: the import trains with it (our HFTokenizer), the
    export gives transformers the same ids."""
    import shutil

    _, hf_dir = exported["gpt2"]
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "tokenizer.model").unlink()
    step = import_checkpoint(src, tmp_path / "ckpt", **QUIET)
    _, config = load_model(step)
    assert config.data.tokenizer.endswith("tokenizer.json")
    ours = load_tokenizer(config.data.tokenizer)
    export_checkpoint(step, tmp_path / "hf", **QUIET)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for text in ["import os\nprint(os.sep)  # 42\n", "  x = 'ü'\t\n"]:
        assert theirs.encode(text) == ours.encode(text)
    assert theirs.eos_token_id == ours.eod == 2


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_import_of_a_transformers_model(flavour, tmp_path):
    """A model transformers itself built and saved (sharded safetensors, no tokenizer) imports at
    TP=2 x PP=2 and gives its logits."""
    torch.manual_seed(0)
    if flavour == "llama":
        config = transformers.LlamaConfig(
            vocab_size=1001,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=123456.0,
            rms_norm_eps=1e-5,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=1001, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", ["parallel.tensor=2", "parallel.pipeline=2"], **QUIET)
    ours, ours_config = load_model(tmp_path / "ckpt")
    assert ours_config.model.vocab_rows == 1024 and ours_config.data.tokenizer == ""
    diff = max_logit_diff(ours, model.eval(), seq=32)
    print(f"{flavour}: import max |logit diff| {diff:.3g}")
    assert diff <= 1e-5


def train_overrides(step_dir, stdlib_data, run_dir):
    return [
        f"data.path={stdlib_data['prefix']}",
        f"checkpoint.resume={step_dir}",
        f"checkpoint.dir={run_dir}",
        "train.steps=2",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "logging.tensorboard=false",
        "logging.peak_tflops=1",
        "optimizer.lr=1e-6",
        "optimizer.min_lr=0",
        "checkpoint.async_save=false",
    ]


def test_imported_checkpoint_trains(exported, stdlib_data, tmp_path):
    """Imported at TP=2, trained on one process: the run resumes from the imported weights with
    a fresh optimizer (at a learning rate of 1e-6, two steps barely move them)."""
    from pretrain.train import run

    _, hf_dir = exported["llama"]
    step = import_checkpoint(hf_dir, tmp_path / "ckpt", ["parallel.tensor=2"], **QUIET)
    overrides = ["parallel.tensor=1"] + train_overrides(step, stdlib_data, tmp_path / "run")
    record = run(load_config(step / "config.yaml", overrides))
    assert record["step"] == 2 and record["loss"] < 10
    before, _ = load_model(step)
    after, _ = load_model(tmp_path / "run")
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        assert 0 < (a - b).abs().max() < 1e-4, name


def test_imported_checkpoint_trains_at_its_own_layout(exported, stdlib_data, tmp_path):
    from pretrain.train import run

    _, hf_dir = exported["gpt2"]
    step = import_checkpoint(hf_dir, tmp_path / "ckpt", **QUIET)
    record = run(load_config(step / "config.yaml", train_overrides(step, stdlib_data, tmp_path / "run")))
    assert record["step"] == 2


# -- mistakes ----------------------------------------------------------------------------------------


def test_export_errors(exported, tmp_path, capsys):
    tool = load_tool("convert_to_hf")
    (tmp_path / "not_a_checkpoint").mkdir()
    assert tool.main(["--checkpoint", str(tmp_path / "not_a_checkpoint"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is not a checkpoint" in err
    result = run_tool("convert_to_hf", "--checkpoint", tmp_path / "not_a_checkpoint", "--output", tmp_path / "o")
    assert result.returncode == 2 and "error:" in result.stderr and "not a checkpoint" in result.stderr
    root, _ = exported["gpt2"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full/notes.txt").write_text("keep")
    assert tool.main(["--checkpoint", str(root), "--output", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(root), "--output", str(tmp_path / "full"), "--force"]) == 0
    assert (tmp_path / "full/notes.txt").read_text() == "keep" and (tmp_path / "full/model.safetensors").is_file()


def test_export_refuses_a_masked_lm(stdlib_data, tmp_path, capsys):
    config = config_from_dict(
        {
            "model": {**MODELS["gpt2"], "bidirectional": True},
            "data": {"objective": "masked", "tokenizer": stdlib_data["tokenizer"]},
        }
    )
    save_checkpoint(
        tmp_path / "ckpt",
        step=1,
        model=GPT(config.model, init_seed=0),
        optimizer=None,
        config=config,
        train_state={"consumed_samples": 0},
    )
    tool = load_tool("convert_to_hf")
    assert tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.bidirectional" in err


def test_export_without_tokenizer_warns(tmp_path, capsys):
    root = make_checkpoint(tmp_path / "ckpt", MODELS["gpt2"], str(tmp_path / "gone.model"))
    export_checkpoint(root, tmp_path / "hf", **QUIET)
    assert "without a tokenizer" in capsys.readouterr().err
    assert json.loads((tmp_path / "hf/config.json").read_text())["eos_token_id"] is None
    hf_model(tmp_path / "hf")


def test_import_refuses_pickles(tmp_path, capsys, gpt2_hf_config):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(gpt2_hf_config))
    (hf / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert load_tool("convert_from_hf").main(["--input", str(hf), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pytorch_model.bin" in err and "safetensors" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type"),
    ],
)
def test_unsupported_llama_features_name_the_key(change, key, llama_hf_config):
    config = llama_hf_config
    model_fields_from_hf(config)
    with pytest.raises(HFConversionError, match=key):
        model_fields_from_hf({**config, **change})


def test_unsupported_gpt2_features_and_weight_overrides(exported, tmp_path, gpt2_hf_config):
    with pytest.raises(HFConversionError, match="activation_function"):
        model_fields_from_hf({**gpt2_hf_config, "activation_function": "gelu"})
    with pytest.raises(HFConversionError, match="scale_attn_by_inverse_layer_idx"):
        model_fields_from_hf({**gpt2_hf_config, "scale_attn_by_inverse_layer_idx": True})
    _, hf_dir = exported["gpt2"]
    with pytest.raises(HFConversionError, match="model.hidden_size"):
        import_checkpoint(hf_dir, tmp_path / "a", ["model.hidden_size=128"], **QUIET)
    with pytest.raises(HFConversionError, match="parallel.tensor"):
        import_checkpoint(hf_dir, tmp_path / "b", ["parallel.tensor=3"], **QUIET)
    # A weight config.json does not announce (llama biases) is refused, not dropped.
    _, llama_dir = exported["llama"]
    src = tmp_path / "biased"
    src.mkdir()
    (src / "config.json").write_text((llama_dir / "config.json").read_text())
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, src / "model.safetensors")
    with pytest.raises(HFConversionError, match="q_proj.bias"):
        import_checkpoint(src, tmp_path / "c", **QUIET)


def test_export_refuses_non_finite_weights_unless_allowed(stdlib_data, tmp_path, capsys):
    config = config_from_dict({"model": MODELS["gpt2"], "data": {"tokenizer": stdlib_data["tokenizer"]}})
    model = GPT(config.model, init_seed=0)
    with torch.no_grad():
        model.blocks["0"].mlp.fc2.weight[0, :3] = float("nan")  # a diverged run's weights
        model.final_norm.weight[0] = float("inf")
    save_checkpoint(
        tmp_path / "ckpt", step=3, model=model, optimizer=None, config=config, train_state={"consumed_samples": 0}
    )
    tool = load_tool("convert_to_hf")
    assert tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert (
        "holds non-finite weights (NaN or Inf) in 2 tensors" in err and "(3 of " in err and "--allow-non-finite" in err
    )
    assert not (tmp_path / "hf/model.safetensors").exists()
    assert (
        tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"), "--allow-non-finite"]) == 0
    )
    assert (tmp_path / "hf/model.safetensors").is_file()
