"""Config loading, overrides and whole-tree validation: every mistake names its key."""

import glob
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted(glob.glob("configs/*.yaml"))


def test_shipped_configs_load():
    assert {c.split("/")[-1] for c in CONFIGS} >= {
        "gpt_tiny.yaml",
        "gpt_125m.yaml",
        "gpt_1.3b.yaml",
        "gpt_13b.yaml",
        "llama_tiny.yaml",
        "llama_1b.yaml",
    }
    for path in CONFIGS:
        config = load_config(path)
        assert config.model.padded_vocab_size % (128 * config.parallel.tensor) == 0


def test_13b_shape_and_padded_vocab():
    m = load_config("configs/gpt_13b.yaml").model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_length) == (40, 5120, 40, 2048)
    assert m.vocab_size == 50257
    # GPT-2 vocabulary padded to a multiple of 128 x TP (TP=4 in the shipped layout).
    assert m.padded_vocab_size == 50688
    assert load_config("configs/gpt_13b.yaml", ["parallel.tensor=8"]).model.padded_vocab_size == 51200


def test_overrides_are_typed():
    c = load_config(
        "configs/gpt_tiny.yaml",
        [
            "train.steps=40",
            "optimizer.lr=1e-4",
            "model.dropout=0.1",
            "parallel.sequence_parallel=false",
            "data.path=0.3 a 0.7 b",
            "train.global_batch_size=16",
            "train.exit_after_minutes=null",
        ],
    )
    assert c.train.steps == 40 and isinstance(c.train.steps, int)
    assert c.optimizer.lr == pytest.approx(1e-4) and isinstance(c.optimizer.lr, float)
    assert c.model.dropout == 0.1
    assert c.data.path == "0.3 a 0.7 b"
    assert c.train.global_batch_size == 16
    assert c.train.exit_after_minutes is None
    # String fields take the text verbatim, whatever YAML would make of it.
    c = load_config("configs/gpt_tiny.yaml", ["data.tokenizer=1e5", "checkpoint.dir=2020-01-01", "train.steps=1e2"])
    assert (c.data.tokenizer, c.checkpoint.dir, c.train.steps) == ("1e5", "2020-01-01", 100)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.stepz=3"], "train.stepz"),
        (["trian.steps=3"], "trian"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["model.flavour=bert"], "model.flavour"),
        (["model.num_heads=3"], "model.hidden_size"),
        (["model.flavour=llama", "model.num_kv_heads=3"], "model.num_kv_heads"),
        (["model.num_kv_heads=2"], "model.num_kv_heads"),  # GQA needs the llama flavour
        (["model.max_position_embeddings=128"], "model.seq_length"),
        (["model.dropout=1.5"], "model.dropout"),
        (["parallel.tensor=3"], "parallel.tensor"),
        (["parallel.pipeline=3"], "model.num_layers"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        (["train.global_batch_size=12"], "train.global_batch_size"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
        (["schedule.decay=step"], "schedule.decay"),
        (["data.split=a,b"], "data.split"),
        (["steps"], "key=value"),
    ],
)
def test_bad_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/gpt_tiny.yaml", overrides)
    assert key in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(path)


def test_derived_defaults():
    c = config_from_dict({"model": {"flavour": "llama", "hidden_size": 256, "num_heads": 8}})
    assert c.model.kv_heads == 8 and c.model.tied is False
    assert c.model.ffn_size % 64 == 0 and c.model.ffn_size >= 8 * 256 / 3
    g = config_from_dict({"model": {"flavour": "gpt2", "hidden_size": 256}})
    assert g.model.ffn_size == 1024 and g.model.tied is True


def test_cli_rejects_bad_override_before_training(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            "configs/gpt_tiny.yaml",
            "model.num_heads=5",
            f"logging.dir={tmp_path}/logs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.hidden_size" in result.stderr and "num_heads=5" in result.stderr
    assert "step" not in result.stdout  # nothing trained
    assert not (tmp_path / "logs").exists()
