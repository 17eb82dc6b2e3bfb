"""Shared fixtures: a small real dataset built by the project's own tools from the stdlib corpus,
a tiny GPT-2's Hugging Face config.json, and the runner of a test file's `--worker` subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> dict:
    """~3 MB of stdlib source -> a 2000-piece tokenizer -> PREFIX_text_document.bin/.idx."""
    out = tmp_path_factory.mktemp("stdlib_data")
    run_tool("tools/make_stdlib_corpus.py", "--output", str(out / "corpus.jsonl"), "--max-bytes", "3000000")
    run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(out / "corpus.jsonl"),
        "--output",
        str(out / "tokenizer"),
        "--vocab-size",
        "2000",
    )
    run_tool(
        "tools/preprocess_data.py",
        "--input",
        str(out / "corpus.jsonl"),
        "--output-prefix",
        str(out / "stdlib"),
        "--tokenizer",
        str(out / "tokenizer.model"),
        "--append-eod",
    )
    return {"prefix": str(out / "stdlib_text_document"), "tokenizer": str(out / "tokenizer.model"), "vocab_size": 2000}


@pytest.fixture
def gpt2_hf_config() -> dict:
    """config.json of a tiny GPT-2 as transformers writes it (the fields the importer reads);
    a fresh dict each time, so a test may change it."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 100,
    }


@pytest.fixture
def llama_hf_config() -> dict:
    """config.json of a tiny Llama as transformers writes it (the fields the importer reads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 512,
    }


@pytest.fixture(scope="session")
def worker_results():
    """`worker_results(script, mode, env, what)`: the JSON that `python SCRIPT --worker MODE`
    prints on its last `RESULTS ` line. A worker is its own process so that environment read at
    import (TRITON_INTERPRET, PRETRAIN_KERNELS) is set before anything imports. Fails the test,
    naming `what`, when it exits non-zero or prints no results; exit code 3 is the workers' way
    of saying that triton is not installed."""

    def run(script, mode: str, env: dict, what: str):
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", mode],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 3:
            pytest.fail(
                f"{what}: triton is not importable: run tests/run.sh (it installs triton)\n" + proc.stderr[-2000:],
                pytrace=False,
            )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
        signal = ""
        if proc.returncode < 0:
            signal = " (killed by a signal: under TRITON_INTERPRET an out-of-bounds access segfaults)"
        assert proc.returncode == 0 and lines, f"{what} failed ({proc.returncode}){signal}:\n{proc.stderr[-4000:]}"
        return json.loads(lines[-1][len("RESULTS ") :])

    return run
