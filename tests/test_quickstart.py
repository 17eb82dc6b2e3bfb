"""The README's first command, shortened: the quickstart runs end to end on the stdlib corpus."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path):
    env = {**os.environ, "QUICKSTART_DIR": str(tmp_path / "qs")}
    result = subprocess.run(
        ["bash", "launch/quickstart.sh", "train.steps=20", "train.eval_interval=10", "checkpoint.interval=10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    qs = tmp_path / "qs"
    for name in (
        "corpus.jsonl",
        "tokenizer.model",
        "data/stdlib_text_document.bin",
        "data/stdlib_text_document.idx",
        "logs/metrics.jsonl",
        "logs/metrics.png",
    ):
        assert (qs / name).stat().st_size > 0, name
    assert (qs / "checkpoints/latest").read_text().strip() == "step_20"
    val = [json.loads(line) for line in (qs / "logs/metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [r["step"] for r in val] == [0, 10, 20] and val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    assert "validation loss:" in result.stdout and "[5/7] sample" in result.stdout
    # The sample is printed after the prompt.
    sample = result.stdout.split("[5/7] sample", 1)[1].split("== [6/7]", 1)[0]
    assert "def " in sample and len(sample.strip().splitlines()) >= 2
    # The exported model loads in transformers and scores text like ours.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.checkpoint import load_model

    hf = AutoModelForCausalLM.from_pretrained(qs / "hf").eval()
    tokens = AutoTokenizer.from_pretrained(qs / "hf")("def main(argv):\n    return 0\n", return_tensors="pt")[
        "input_ids"
    ]
    ours, _ = load_model(qs / "checkpoints")
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4

    # Running it again skips the finished steps and resumes from the latest checkpoint.
    again = subprocess.run(
        ["bash", "launch/quickstart.sh", "train.steps=25", "train.eval_interval=10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("exists, skipped") == 3
    assert "resumed from" in again.stdout and "step_20" in again.stdout
    assert (qs / "checkpoints/latest").read_text().strip() == "step_25"
