"""ZeRO checkpoints hold each data-parallel rank's own partition, and load at any layout.

A ZeRO run saves after step 2 (in the background) and trains on to step 4; the same checkpoint
then resumes at the saved layout and at others (another DP size, another ZeRO stage, no ZeRO,
another TP size), and steps 3-4 must give the uninterrupted run's losses (fp32; 2e-5 absolute,
as the layouts themselves agree in test_parallel.py). Each rank's files must hold only its own
fragments (sizes add up to the model's state once, split ~1/DP), a resume at the saved layout
must read only the rank's own two files, and load_model must return the live weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from parallel_harness import make_config, run_job
from safetensors import safe_open

from pretrain.checkpoint import load_model

TOL = 2e-5
LLAMA = ["model.flavour=llama", "model.num_kv_heads=2"]


def world(overrides: list[str], dp: int) -> int:
    p = make_config(overrides).parallel
    return p.tensor * p.pipeline * dp


def resume(layout: list[str], dp: int, step_dir) -> dict:
    return run_job(layout, world=world(layout, dp), first=3, last=4, resume=str(step_dir))[0]


def file_numels(step_dir, kind: str) -> dict[str, dict[str, int]]:
    """file name -> tensor key -> elements, for the model_* or optimizer_* files."""
    out = {}
    for path in sorted(step_dir.glob(f"{kind}_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


def check_fragment_files(step_dir, *, dp: int, params_per_position: int, positions: int) -> None:
    """Every element of every parameter is in exactly one file of its TP position, split about
    1/DP per rank; the optimizer files hold the two moments of the same elements."""
    weights, states = file_numels(step_dir, "model"), file_numels(step_dir, "optimizer")
    assert len(weights) == len(states) == dp * positions
    per_file = [sum(v.values()) for v in weights.values()]
    assert sum(per_file) == params_per_position * positions  # no element twice, none missing
    for numel in per_file:  # each rank its own share (DeepSpeed's padding aside)
        assert numel == pytest.approx(params_per_position / dp, rel=0.02)
    for name, keys in states.items():
        moments = sum(n for k, n in keys.items() if not k.endswith("/step"))
        assert moments == 2 * sum(weights[name.replace("optimizer_", "model_")].values())
    with safe_open(str(next(step_dir.glob("model_*part1*"))), framework="pt") as f:
        fragments = json.loads(f.metadata()["fragments"])
        assert fragments and all(len(v) == 2 for v in fragments.values())


@pytest.mark.parametrize(
    "stage, resumes",
    [
        (1, [([], 4, 1), ([], 1, 0)]),  # DP 4 under ZeRO-1; one process without ZeRO
        (2, [([], 1, 0)]),
        (3, [([], 4, 1)]),
    ],
    ids=["zero1", "zero2", "zero3"],
)
def test_dp2_checkpoint_holds_own_partitions_and_resumes_at_any_layout(tmp_path, stage, resumes):
    zero = [f"parallel.zero_stage={stage}", "parallel.zero3_persistence_threshold=0"]
    straight = run_job(
        [*LLAMA, *zero],
        world=2,
        last=4,
        save=str(tmp_path),
        save_at=2,
        dump_weights=str(tmp_path / "live.pt") if stage < 3 else None,
    )
    step_dir = tmp_path / "step_2"
    check_fragment_files(step_dir, dp=2, params_per_position=straight[0]["params"], positions=1)

    # The saved layout: each rank reads its own two files and nothing else.
    same = run_job([*LLAMA, *zero], world=2, first=3, last=4, resume=str(step_dir))
    for r in same:
        part = f"tp0_pp0_part{r['dp_rank']}.safetensors"
        assert sorted(set(r["read_files"])) == [f"model_{part}", f"optimizer_{part}"]
    assert same[0]["loss"] == pytest.approx(straight[0]["loss"][2:], abs=TOL)

    for extra, dp, other_stage in resumes:
        layout = [*LLAMA, *extra, f"parallel.zero_stage={other_stage}"]
        got = resume(layout, dp, step_dir)
        assert got["loss"] == pytest.approx(straight[0]["loss"][2:], abs=TOL), (layout, dp)

    if stage < 3:  # load_model puts the fragments together into the live weights
        live = torch.load(tmp_path / "live.pt", weights_only=True)
        model, _ = load_model(step_dir)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), live[name]), name


def test_tp2_dp2_zero1_checkpoint_resumes_at_tp1_and_at_its_own_layout(tmp_path):
    """Sequence parallelism and vocabulary padding (250 -> 256 rows at TP 2): resumed at the
    same layout (own files only), at TP 1 x DP 2 under ZeRO-2, and at TP 1 without ZeRO;
    resharded offline and exported to Hugging Face format."""
    saved_at = [*LLAMA, "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]
    straight = run_job(saved_at, world=4, last=4, save=str(tmp_path), save_at=2)
    step_dir = tmp_path / "step_2"
    check_fragment_files(step_dir, dp=2, params_per_position=straight[0]["params"], positions=2)
    same = run_job(saved_at, world=4, first=3, last=4, resume=str(step_dir))
    assert all(len(set(r["read_files"])) == 2 for r in same)
    assert same[0]["loss"] == pytest.approx(straight[0]["loss"][2:], abs=TOL)
    for layout, dp in (([*LLAMA, "parallel.zero_stage=2"], 2), (LLAMA, 1)):
        got = resume(layout, dp, step_dir)
        assert got["loss"] == pytest.approx(straight[0]["loss"][2:], abs=TOL), layout

    # Offline tools read the fragments too: resharded to TP 1 (whole shards) nothing changes, and
    # the Hugging Face export holds the same weights.
    from pretrain.checkpoint import SavedCheckpoint, reshard_checkpoint
    from pretrain.hf.convert import export_checkpoint, read_hf_weights

    tp1 = reshard_checkpoint(
        step_dir, tmp_path / "tp1", ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.zero_stage=0"]
    )
    a, b = SavedCheckpoint(step_dir), SavedCheckpoint(tp1)
    vocab = make_config(LLAMA).model.vocab_size
    for name in a.names:
        for key in [None, *a.optimizer_keys(name)]:
            x, y = a.full(name, key), b.full(name, key)
            if name in ("embed.weight", "head.weight") and x.dim():
                x, y = x[:vocab], y[:vocab]
            assert torch.equal(x, y), (name, key)
    model, _ = load_model(step_dir)
    hf = read_hf_weights(export_checkpoint(step_dir, tmp_path / "hf", log=lambda *_: None))
    assert torch.equal(hf["model.embed_tokens.weight"], model.embed.weight.detach()[:vocab])


def test_format_2_checkpoints_still_load(tmp_path):
    """Format 2 (before ZeRO fragments) stored whole TP shards, as format 3 does without ZeRO:
    such a checkpoint still loads, into the single-device model and into a training run."""
    from pretrain.checkpoint import load_checkpoint, save_checkpoint
    from pretrain.models.gpt import GPT
    from pretrain.optim import build_optimizer

    config = make_config(LLAMA)
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    tokens = torch.randint(0, config.model.vocab_size, (2, config.model.seq_length))
    model(tokens, labels=tokens).backward()
    optimizer.step()
    step_dir = save_checkpoint(
        tmp_path, step=1, model=model, optimizer=optimizer, config=config, train_state={"consumed_samples": 0}
    )
    meta = json.loads((step_dir / "meta.json").read_text())
    (step_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    loaded, _ = load_model(step_dir)
    for name, p in model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach()), name
    fresh = GPT(config.model)
    fresh_optimizer = build_optimizer(fresh.parameters(), config.optimizer)
    assert load_checkpoint(step_dir, model=fresh, optimizer=fresh_optimizer, config=config)["step"] == 1
    ours, theirs = fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert torch.equal(ours[0]["exp_avg"], theirs[0]["exp_avg"])
