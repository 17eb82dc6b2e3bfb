"""User mistakes and damaged inputs end in one `error: ...` line naming what is wrong (exit 2 from
the command-line tools), never in a traceback."""

import json
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
        load_config("configs/gpt_tiny.yaml", [f"train.steps={steps}"])


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

    meta = {"format_version": FORMAT_VERSION, "step": 10, "layout": {"tensor": 1, "pipeline": 1, "data": 1},
            "world_size": 1, "parts": 1, "has_optimizer": True, "has_rng": True,
            "train_state": {"consumed_samples": 80}}
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
