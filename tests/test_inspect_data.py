"""tools/inspect_data.py on the stdlib data: the summary's counts and percentiles, the length
histogram, a document decoded, --check-vocab naming the first id out of range, clear errors for
a missing or truncated prefix, and --step giving the micro-batches the run's loader gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import config_from_dict
from pretrain.data import setup
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from pretrain.data.inspect import last_rollback_before, micro_batches_at
from pretrain.data.setup import build_data
from pretrain.data.tokenizer import load_tokenizer
from pretrain.parallel.topology import CPU, Topology

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import inspect_data  # noqa: E402


def inspect(capsys, *args) -> tuple[int, str, str]:
    code = inspect_data.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_counts_and_length_percentiles(stdlib_data, capsys):
    prefix = stdlib_data["prefix"]
    code, out, _ = inspect(capsys, prefix)
    ds = IndexedDataset(prefix)
    p50, p90, p99 = (round(v) for v in np.percentile(ds.sequence_lengths, [50, 90, 99]))
    row = out.splitlines()[1].split()
    assert code == 0 and row[0] == prefix and row[2] == "uint16"
    assert row[3:] == [f"{n:,}" for n in (len(ds), ds.num_tokens, p50, p90, p99, int(ds.sequence_lengths.max()))]


def test_a_blend_shows_normalised_weights_a_total_and_a_histogram(stdlib_data, tmp_path, capsys):
    other = tmp_path / "other_text_document"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(stdlib_data["prefix"] + suffix, str(other) + suffix)
    png = tmp_path / "lengths.png"
    code, out, _ = inspect(capsys, f"3 {stdlib_data['prefix']} 1 {other}", "--histogram", png)
    lines = out.splitlines()
    tokens = IndexedDataset(str(other)).num_tokens
    assert code == 0 and lines[1].split()[1] == "0.750" and lines[2].split()[1] == "0.250"
    assert lines[3].split()[0] == "total" and lines[3].split()[2] == f"{2 * tokens:,}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


def test_a_document_is_decoded_with_its_end_marked(stdlib_data, capsys):
    code, out, _ = inspect(capsys, stdlib_data["prefix"], "--document", 5, "--tokenizer", stdlib_data["tokenizer"])
    ids = IndexedDataset(stdlib_data["prefix"])[5]
    tokenizer = load_tokenizer(stdlib_data["tokenizer"])
    assert code == 0 and int(ids[-1]) == tokenizer.eod  # preprocessed with --append-eod
    assert out.split("---\n", 1)[1] == tokenizer.decode(ids[:-1].tolist()) + "\n<eod>\n\n"
    code, _, err = inspect(capsys, stdlib_data["prefix"], "--document", 10**6, "--tokenizer", stdlib_data["tokenizer"])
    assert code == 2 and "--document 1000000" in err and "documents (0.." in err


def test_check_vocab_names_the_first_document_and_position(stdlib_data, tmp_path, capsys):
    code, out, _ = inspect(capsys, stdlib_data["prefix"], "--check-vocab", stdlib_data["vocab_size"])
    assert code == 0 and "token ids are below 2000" in out
    prefix = str(tmp_path / "wide")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
        for document in ([1, 2, 3], [], [4, 5, 99, 6, 120], [7]):  # an empty document shares a pointer
            writer.add_document(document)
    code, _, err = inspect(capsys, prefix, "--check-vocab", 64)
    assert code == 1
    assert f"{prefix}.bin: document 2, token 2: id 99 is not in [0, 64); 2 tokens of it are out of range" in err


def test_missing_and_truncated_prefixes_say_which_file(stdlib_data, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "tools/inspect_data.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True
        )

    missing = cli(tmp_path / "nope")
    assert missing.returncode == 2 and f"{tmp_path}/nope.idx: file not found" in missing.stderr
    cut = tmp_path / "cut_text_document"
    shutil.copyfile(stdlib_data["prefix"] + ".idx", f"{cut}.idx")
    data = Path(stdlib_data["prefix"] + ".bin").read_bytes()
    half = len(data) // 4 * 2  # whole uint16 tokens: the index no longer matches
    Path(f"{cut}.bin").write_bytes(data[:half])
    truncated = cli(cut)
    assert truncated.returncode == 2 and f"{cut}.bin: size {half} bytes" in truncated.stderr
    assert "one is truncated" in truncated.stderr
    blend = cli(f"0.5 {stdlib_data['prefix']} 0.5")
    assert blend.returncode == 2 and "has 3 words" in blend.stderr


def run_config(data, tmp_path):
    stages = f"[{{path: {data['prefix']}, start_step: 0}}, {{path: '0.5 {data['prefix']} 0.5 {data['prefix']}2', "
    stages += "start_step: 3}]"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(data["prefix"] + suffix, data["prefix"] + "2" + suffix)
    overrides = [
        f"data.stages={stages}",
        f"data.tokenizer={data['tokenizer']}",
        f"data.cache_dir={tmp_path}/cache",
        "model.vocab_size=2000",
        "model.seq_length=32",
        "train.steps=6",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
    ]
    return overrides, config_from_dict({}, overrides)


@pytest.mark.parametrize("step", [2, 5])
def test_step_gives_the_micro_batches_the_loader_gives(stdlib_data, tmp_path, monkeypatch, step):
    """DP rank 1 of 2 at a step of each stage: the tool's tokens are the real loader's."""
    _, config = run_config(stdlib_data, tmp_path)
    stage, views = micro_batches_at(config, step=step, dp_rank=1, world_size=2)  # builds the caches
    monkeypatch.setattr(setup.dist, "barrier", lambda: None)  # rank 1 alone, in this process
    rank1 = Topology(world_size=2, rank=1, tp=1, pp=1, dp=2, virtual_stages=1, sequence_parallel=False, device=CPU)
    loader = build_data(config, rank1).train
    for s in range(1, step + 1):
        loader.begin_step(s)
        batches = [next(loader)["tokens"] for _ in range(2)]  # 8 / (2 x 2 ranks) micro-batches
    assert stage.startswith(f"data stage {1 if step <= 3 else 2} of 2")
    assert [v.index for v in views] == [0, 1]
    for view, batch in zip(views, batches):
        assert torch.equal(torch.from_numpy(view.tokens), batch)
    before = (step - 1 - (0 if step <= 3 else 3)) * 8  # the stage's samples read by earlier steps
    assert views[0].positions.tolist() == [before + 2, before + 3]  # rank 1's block of 2


def test_step_from_the_command_line(stdlib_data, tmp_path, capsys):
    overrides, _ = run_config(stdlib_data, tmp_path)
    code, out, _ = inspect(capsys, "--config", "configs/gpt_tiny.yaml", "data.path=", *overrides, "--step", 4)
    assert code == 0 and "data stage 1 of 2:" in out and "data stage 2 of 2:" in out
    assert "step 4, data-parallel rank 0: data stage 2 of 2 (steps 4-6)" in out
    assert out.count("micro-batch ") == 4 and out.count("--- position ") == 8
    code, _, err = inspect(capsys, "--config", "configs/gpt_tiny.yaml", "data.path=", *overrides, "--step", 7)
    assert code == 2 and "--step 7 is not a step of this run (1..train.steps=6)" in err


def test_step_follows_the_runs_rollbacks(stdlib_data, tmp_path, capsys):
    """A rollback from step 4 back to step 2 keeps the loader's place (steps 1-3 read 24 samples
    of stage 1, step 4 read 8 of stage 2), so the steps trained after it read on from there, each
    in its own stage; metrics.jsonl records that position and --step follows it."""
    overrides, config = run_config(stdlib_data, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    position = {
        "consumed_samples": 32,
        "data_stages": [
            {"start": 0, "path": stdlib_data["prefix"], "consumed_samples": 24},
            {"start": 3, "path": f"0.5 {stdlib_data['prefix']} 0.5 {stdlib_data['prefix']}2", "consumed_samples": 8},
        ],
    }
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "rollback": {"from_step": 4, "data_position": position}}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')  # a torn last line
    assert last_rollback_before(str(metrics), 2) is None
    assert last_rollback_before(str(metrics), 3) == (2, position)
    # Step 3 (stage 1) reads on at 24; step 5 (stage 2): 8, plus step 4's batch = 16.
    for step, before in ((3, 24), (5, 16)):
        _, views = micro_batches_at(config, step=step, dp_rank=1, world_size=2, rollback=(2, position))
        assert views[0].positions.tolist() == [before + 2, before + 3]
    code, out, _ = inspect(
        capsys, "--config", "configs/gpt_tiny.yaml", "data.path=", *overrides, "--step", 5, "--metrics", metrics
    )
    assert code == 0 and f"after the rollback to step 2 in {metrics}" in out
    assert "micro-batch 0: positions in the stage's stream [16, 17]" in out
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"step": 2, "rollback": {"from_step": 4, "skipped_samples": 16}}) + "\n")
    code, _, err = inspect(
        capsys, "--config", "configs/gpt_tiny.yaml", "data.path=", *overrides, "--step", 5, "--metrics", old
    )
    assert code == 2 and "does not record its data position" in err
