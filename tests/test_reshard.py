"""Resharding: a checkpoint saved at one layout (TP, PP, DP, virtual stages, ZeRO stage) resumes at
another, weights and optimizer state both, and the next steps' losses equal those of the run
that never stopped (fp32; tolerance 2e-5 absolute, as for the layouts themselves in
test_parallel.py: the same arithmetic in another order)."""

from pathlib import Path

import pytest
import torch
from parallel_harness import make_config, run_job

from pretrain.checkpoint import SavedCheckpoint, merged_state_dict, reshard_checkpoint

TOL = 2e-5
LLAMA = ["model.flavour=llama", "model.num_kv_heads=2"]
GRID = ["parallel.tensor=2", "parallel.pipeline=2"]  # x DP 2 on 8 ranks


def world(overrides: list[str], dp: int) -> int:
    p = make_config(overrides).parallel
    return p.tensor * p.pipeline * dp


@pytest.fixture(scope="module")
def gpt2_grid(tmp_path_factory):
    """gpt2 (tied embedding on both pipeline ends, vocabulary 250 padded to 256) trained 4 steps
    at TP2 x PP2 x DP2, saved after step 2 in the background while it trained on."""
    ckpt = tmp_path_factory.mktemp("gpt2_grid")
    straight = run_job(GRID, world=8, last=4, save=str(ckpt), save_at=2)[0]
    return ckpt / "step_2", straight


@pytest.mark.parametrize(
    "layout,dp",
    [
        ([], 1),  # one process
        (["parallel.tensor=4"], 1),  # TP 4: vocabulary padded to 512 rows
        (["parallel.pipeline=2"], 1),  # PP 2 without TP
        (["parallel.zero_stage=1"], 4),  # DP 4 under ZeRO-1
    ],
    ids=["tp1_pp1", "tp4", "pp2", "dp4_zero1"],
)
def test_tp2_pp2_dp2_resumes_at_another_layout(gpt2_grid, layout, dp):
    step_dir, straight = gpt2_grid
    resumed = run_job(layout, world=world(layout, dp), first=3, last=4, resume=str(step_dir))[0]
    assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=TOL)
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"][2:], rel=1e-4)
    assert straight["loss"][3] != straight["loss"][2]


def test_zero_interleaved_llama_resumes_without_zero_and_under_zero3(tmp_path):
    """Grouped-query attention, SwiGLU; saved under ZeRO-1 with interleaved virtual stages and
    sequence parallelism, resumed on one process without ZeRO and at DP 2 under ZeRO-3."""
    saved_at = [*LLAMA, *GRID, "parallel.virtual_stages=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]
    straight = run_job(saved_at, world=8, last=4, save=str(tmp_path), save_at=2)[0]
    for layout, dp in ((LLAMA, 1), ([*LLAMA, "parallel.zero_stage=3", "parallel.zero3_persistence_threshold=0"], 2)):
        resumed = run_job(layout, world=world(layout, dp), first=3, last=4, resume=str(tmp_path / "step_2"))[0]
        assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=TOL), layout


def test_offline_reshard_round_trips_bit_exactly(gpt2_grid, tmp_path):
    """tools/reshard_checkpoint.py's function: TP2xPP2 -> TP4 -> TP1xPP2(x2 virtual) -> TP1:
    every weight and optimizer tensor comes back bit for bit (vocabulary padding aside)."""
    step_dir, _ = gpt2_grid
    tp4 = reshard_checkpoint(step_dir, tmp_path / "tp4", ["parallel.tensor=4", "parallel.pipeline=1"], data_parallel=2)
    assert sorted(p.name for p in tp4.glob("model_*")) == [
        f"model_tp{t}_pp0_part{d}.safetensors" for t in range(4) for d in range(2)
    ]
    pp2 = reshard_checkpoint(
        tp4, tmp_path / "pp2", ["parallel.tensor=1", "parallel.pipeline=2", "parallel.virtual_stages=2"]
    )
    back = reshard_checkpoint(
        pp2, tmp_path / "tp1", ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_stages=1"]
    )
    a, b = SavedCheckpoint(step_dir), SavedCheckpoint(back)
    assert a.names == b.names
    vocab = 250
    for name in a.names:
        wa, wb = a.full(name), b.full(name)
        if name == "embed.weight":
            wa, wb = wa[:vocab], wb[:vocab]
        assert torch.equal(wa, wb), name
        for key in a.optimizer_keys(name):
            sa, sb = a.full(name, key), b.full(name, key)
            if name == "embed.weight" and sa.dim():
                sa, sb = sa[:vocab], sb[:vocab]
            assert torch.equal(sa, sb), (name, key)
    assert SavedCheckpoint(tp4).shapes["embed.weight"][0] == 512
    assert merged_state_dict(back)["embed.weight"].shape[0] == 256


def test_offline_reshard_refuses_an_impossible_layout(gpt2_grid, tmp_path):
    from pretrain.config import ConfigError

    step_dir, _ = gpt2_grid
    with pytest.raises(ConfigError, match="parallel.tensor"):
        reshard_checkpoint(step_dir, tmp_path / "x", ["parallel.tensor=3"])
    with pytest.raises(ValueError, match="only parallel"):
        reshard_checkpoint(step_dir, tmp_path / "x", ["model.hidden_size=8"])
    assert not Path(tmp_path / "x").exists() or not any(Path(tmp_path / "x").iterdir())
