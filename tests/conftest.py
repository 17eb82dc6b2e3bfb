"""Shared fixtures: a small real dataset built by the project's own tools from the stdlib corpus."""

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
