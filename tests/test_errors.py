"""User mistakes and damaged inputs end in one `error: ...` line naming what is wrong (exit 2 from
the command-line tools), never in a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_clear_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_steps_must_be_positive(steps):
    with pytest.raises(ConfigError, match=r"train.steps: must be >= 1"):
        load_config(ROOT / "configs/gpt_tiny.yaml", [f"train.steps={steps}"])


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml: expected a mapping .* got a {kind}"):
        load_config(path, ["train.steps=3"])


def test_cli_train_steps_zero_exits_2(tmp_path):
    result = run_cli("-m", "pretrain.train", "configs/gpt_tiny.yaml", "train.steps=0", f"logging.dir={tmp_path}/l")
    assert_clear_error(result, "train.steps: must be >= 1")


def test_cli_yaml_list_exits_2(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- train\n")
    result = run_cli("-m", "pretrain.train", str(path), "train.steps=3")
    assert_clear_error(result, "list.yaml: expected a mapping")


def _meta_without(tmp_path: Path, *missing: str) -> Path:
    from pretrain.checkpoint.files import FORMAT_VERSION

    meta = {
        "format_version": FORMAT_VERSION,
        "step": 10,
        "layout": {"tensor": 1, "pipeline": 1, "data": 1},
        "world_size": 1,
        "parts": 1,
        "has_optimizer": True,
        "has_rng": True,
        "train_state": {"consumed_samples": 80},
    }
    for key in missing:
        meta.pop(key)
    step_dir = tmp_path / "ck" / "step_10"
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text(json.dumps(meta))
    return step_dir


@pytest.mark.parametrize("field", ["train_state", "step", "layout"])
def test_meta_json_missing_field_is_named(tmp_path, field):
    from pretrain.checkpoint import read_meta
    from pretrain.checkpoint.files import CheckpointError

    step_dir = _meta_without(tmp_path, field)
    with pytest.raises(CheckpointError, match=rf"step_10/meta.json: missing field '{field}'"):
        read_meta(step_dir)


def test_meta_json_complete_is_read(tmp_path):
    from pretrain.checkpoint import read_meta

    assert read_meta(_meta_without(tmp_path))["train_state"]["consumed_samples"] == 80


def test_cli_meta_json_missing_field_exits_2(tmp_path):
    step_dir = _meta_without(tmp_path, "train_state")
    result = run_cli("tools/convert_to_hf.py", "--checkpoint", str(step_dir), "--output", str(tmp_path / "hf"))
    assert_clear_error(result, "meta.json: missing field 'train_state'")


@pytest.mark.parametrize("seq_length", [5, 16])
def test_token_ids_beyond_the_vocabulary_name_file_and_document(tmp_path, seq_length):
    """Tokens are their global positions, so a small vocabulary is exceeded in a known place;
    the message must name the .bin and the document and token that hold the offending id."""
    import re

    import numpy as np

    from pretrain.data.gpt_dataset import GPTDataset
    from pretrain.data.indexed import IndexedDatasetWriter
    from pretrain.data.loader import SampleLoader, TokenRangeError

    lengths = np.random.default_rng(0).integers(0, 40, size=30)
    lengths[[0, 4]] = 0
    docs, start, prefix = [], 0, str(tmp_path / "num")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for n in lengths:
            docs.append(np.arange(start, start + n, dtype=np.int32))
            writer.add_document(docs[-1])
            start += n
    ds = GPTDataset(prefix, seq_length=seq_length, split_ratios=(1, 0, 0), cache_dir=str(tmp_path / "cache"))
    vocab = start // 2
    loader = SampleLoader(ds, micro_batch_size=3, seed=1, vocab_size=vocab)
    failures = 0
    for _ in range(len(ds) // 3):
        try:
            next(loader)
        except TokenRangeError as e:
            failures += 1
            found = re.search(r"token id (\d+) in (\S+)\.bin, document (\d+) \(token (\d+) of it\)", str(e))
            assert found, str(e)
            token_id, file, document, position = found.group(1, 2, 3, 4)
            assert file == prefix
            assert int(token_id) >= vocab and docs[int(document)][int(position)] == int(token_id)
            assert f"[0, {vocab})" in str(e) and "model.vocab_size" in str(e)
    assert failures > 0
    ok = SampleLoader(ds, micro_batch_size=3, seed=1, vocab_size=start)  # every id fits
    for _ in range(len(ds) // 3):
        next(ok)


@pytest.mark.parametrize("keep", [4, 200])  # a header cut short, and tensors cut short
def test_truncated_safetensors_is_named(tmp_path, keep, gpt2_hf_config):
    import torch
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(gpt2_hf_config))
    save_file({"transformer.wte.weight": torch.zeros(100, 64)}, str(hf / "model.safetensors"))
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:keep])
    result = run_cli("tools/convert_from_hf.py", "--input", str(hf), "--output", str(tmp_path / "out"))
    assert_clear_error(result, f"{hf / 'model.safetensors'} is not a readable safetensors file", "download it again")
    assert not (tmp_path / "out").exists()


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory nobody may create files in. Root ignores permission bits, so as root use
    /proc/self, which refuses new files to everyone."""
    if os.geteuid() == 0:
        return Path("/proc/self")
    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


def test_preprocess_refuses_an_unwritable_output_directory_before_tokenizing(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    out = _unwritable_directory(tmp_path)
    # The tokenizer path does not exist: the output check must come first, before it is loaded.
    result = run_cli(
        "tools/preprocess_data.py",
        "--input",
        str(corpus),
        "--output-prefix",
        str(out / "data"),
        "--tokenizer",
        str(tmp_path / "no_such.model"),
    )
    assert_clear_error(result, f"cannot write in the directory {out}", "writable location")
    assert "no_such.model" not in result.stderr


def test_check_output_directory_creates_a_missing_one(tmp_path):
    from pretrain.data.preprocess import check_output_directory

    assert check_output_directory(str(tmp_path / "new" / "data")) == str(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # the probe leaves nothing behind


@pytest.mark.parametrize(
    "script", ["pretrain_gpt_125m.sh", "pretrain_gpt_1.3b.sh", "pretrain_gpt_13b.sh", "preprocess_data.sh"]
)
def test_slurm_script_submitted_from_elsewhere_says_what_to_do(tmp_path, script):
    """sbatch runs a spool copy of the script with SLURM_SUBMIT_DIR = where sbatch was run."""
    spool_copy = tmp_path / "slurm_script"
    spool_copy.write_text((ROOT / "slurm" / script).read_text())
    env = {k: v for k, v in os.environ.items() if k != "PRETRAIN_ROOT"}
    env.update(
        SLURM_SUBMIT_DIR=str(tmp_path),
        PRETRAIN_INPUTS="x",
        PRETRAIN_OUTPUT_DIR=str(tmp_path / "o"),
        PRETRAIN_TOKENIZER="t",
    )
    result = subprocess.run(
        ["bash", str(spool_copy)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "No such file or directory" not in result.stderr
    assert "submit from the pretrain checkout" in result.stderr and "PRETRAIN_ROOT=/path/to/checkout" in result.stderr
    assert str(tmp_path) in result.stderr


def test_cli_training_on_ids_beyond_the_vocabulary_exits_2(tmp_path):
    import numpy as np

    from pretrain.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "big_ids")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for d in range(40):
            writer.add_document(np.full(50, 300 + d, dtype=np.int32))  # every id >= 256
    result = run_cli(
        "-m",
        "pretrain.train",
        "configs/gpt_tiny.yaml",
        f"data.path={prefix}",
        "data.tokenizer=",
        "model.vocab_size=256",
        "train.steps=2",
        "train.eval_interval=0",
        "train.device=cpu",
        f"logging.dir={tmp_path}/logs",
        "logging.tensorboard=false",
        "checkpoint.dir=",
        "logging.peak_tflops=1",
    )
    assert_clear_error(result, f"{prefix}.bin, document", "outside the model's vocabulary [0, 256)")
