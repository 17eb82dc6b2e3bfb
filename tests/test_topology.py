"""Single-process checks of the parallel layout: config/layout validation and the pipeline schedules.

The schedules' data dependencies are checked by simulating every pipeline rank's operation list
together, with messages that wait for nobody (as if buffered):

  - F of virtual stage v > 0 can run once F of stage v - 1 (same micro-batch) has run,
  - B of virtual stage v < last can run once B of stage v + 1 (same micro-batch) has run,
  - B of a stage needs its own F (same rank, same chunk) first.

The simulation runs each rank's next op as soon as it is ready; if no rank can move while some
have ops left, no transport could run the schedule. Whether the executor's transfers also run
under NCCL's stricter rules is tests/test_nccl_rules.py's job, on real ranks.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, config_from_dict, load_config, validate_layout
from pretrain.parallel.pipeline import Op, flatten, interleaved_one_f_one_b, make_schedule, one_f_one_b
from pretrain.parallel.topology import Topology

BASE = {
    "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 250, "seq_length": 32},
    "train": {"micro_batch_size": 2, "global_batch_size": 8},
}


def config(*overrides: str):
    return config_from_dict(BASE, list(overrides))


# --- validate_layout -------------------------------------------------------------------------


def test_valid_layouts_return_data_parallel_size():
    assert validate_layout(config(), 1) == 1
    assert validate_layout(config("parallel.tensor=2"), 4) == 2
    assert validate_layout(config("parallel.tensor=2", "parallel.pipeline=2"), 8) == 2
    assert validate_layout(config("parallel.pipeline=2", "parallel.virtual_stages=2"), 2) == 1


def test_world_size_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 2 x 2 = 4"):
        validate_layout(config("parallel.tensor=2", "parallel.pipeline=2"), 6)


def test_global_batch_not_divisible_by_micro_times_dp():
    # world 4 / tensor 2 = DP 2; 10 sequences cannot be split into micro-batches of 2 on 2 ranks.
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 10 is not divisible by .* = 2 x 2"):
        validate_layout(config("parallel.tensor=2", "train.global_batch_size=10"), 4)


def test_interleaving_without_pipeline():
    with pytest.raises(ConfigError, match=r"parallel.virtual_stages: .*parallel.pipeline > 1"):
        validate_layout(config("parallel.virtual_stages=2"), 1)


def test_interleaving_needs_micro_batches_multiple_of_pipeline():
    # 6 sequences / micro 2 / DP 1 = 3 micro-batches, not a multiple of 2 stages.
    with pytest.raises(ConfigError, match=r"micro-batches per step \(3\) .* parallel.pipeline=2"):
        validate_layout(config("parallel.pipeline=2", "parallel.virtual_stages=2", "train.global_batch_size=6"), 2)


# --- load_config -----------------------------------------------------------------------------


@pytest.fixture
def yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  num_layers: 6\n  hidden_size: 96\n  num_heads: 6\n  vocab_size: 250\n"
        "  seq_length: 32\ntrain:\n  micro_batch_size: 1\n"
    )
    return path


def test_load_config_accepts_a_fitting_layout(yaml_config):
    c = load_config(yaml_config, ["parallel.tensor=3", "parallel.pipeline=3", "parallel.virtual_stages=2"])
    assert (c.parallel.tensor, c.parallel.pipeline, c.parallel.virtual_stages) == (3, 3, 2)


def test_load_config_heads_not_divisible_by_tensor(yaml_config):
    with pytest.raises(
        ConfigError,
        match=r"run.yaml: parallel.tensor: model.num_heads=6 is not divisible by "
        r"parallel.tensor=4",
    ):
        load_config(yaml_config, ["parallel.tensor=4"])


@pytest.mark.parametrize("pp, vp", [(4, 1), (2, 2)])
def test_load_config_layers_not_divisible_by_stages(yaml_config, pp, vp):
    with pytest.raises(
        ConfigError,
        match=rf"model.num_layers: 6 layers cannot be split into parallel.pipeline="
        rf"{pp} x parallel.virtual_stages={vp} = {pp * vp} equal stages",
    ):
        load_config(yaml_config, [f"parallel.pipeline={pp}", f"parallel.virtual_stages={vp}"])


# --- pipeline schedules ----------------------------------------------------------------------


class Deadlock(AssertionError):
    pass


def schedules(pp: int, vp: int, micro: int) -> list[list[Op]]:
    if vp == 1:
        return [flatten(one_f_one_b(pp=pp, pp_rank=r, micro_batches=micro)) for r in range(pp)]
    return [flatten(interleaved_one_f_one_b(pp=pp, pp_rank=r, vp=vp, micro_batches=micro)) for r in range(pp)]


def simulate(ops_per_rank: list[list[Op]], *, pp: int, vp: int, cost=None) -> float:
    """Run all ranks' op lists with blocking receives; returns the makespan (with `cost(op)` the
    duration of an op, default 1). Raises Deadlock naming each stuck rank's next op."""
    cost = cost or (lambda op: 1.0)
    last = pp * vp - 1
    finish: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage, micro) -> end time
    clock = [0.0] * pp
    pos = [0] * pp

    def needs(rank: int, op: Op) -> list[tuple[str, int, int]]:
        v = op.chunk * pp + rank
        if op.kind == "F":
            return [("F", v - 1, op.micro)] if v > 0 else []
        return [("F", v, op.micro)] + ([("B", v + 1, op.micro)] if v < last else [])

    while any(pos[r] < len(ops_per_rank[r]) for r in range(pp)):
        moved = False
        for rank in range(pp):
            while pos[rank] < len(ops_per_rank[rank]):
                op = ops_per_rank[rank][pos[rank]]
                deps = needs(rank, op)
                if any(d not in finish for d in deps):
                    break
                start = max([clock[rank]] + [finish[d] for d in deps])
                clock[rank] = start + cost(op)
                finish[(op.kind, op.chunk * pp + rank, op.micro)] = clock[rank]
                pos[rank] += 1
                moved = True
        if not moved:
            stuck = {r: ops_per_rank[r][pos[r]] for r in range(pp) if pos[r] < len(ops_per_rank[r])}
            raise Deadlock(f"pp={pp} vp={vp}: no rank can move; waiting: {stuck}")
    return max(clock)


CASES_1F1B = [(pp, m) for pp in (1, 2, 3, 4) for m in (1, 2, 3, 4, 5, 8)]
CASES_INTERLEAVED = [(pp, vp, k * pp) for pp in (2, 3, 4) for vp in (2, 3) for k in (1, 2, 3)]
ALL_CASES = [(pp, 1, m) for pp, m in CASES_1F1B] + CASES_INTERLEAVED


@pytest.mark.parametrize("pp, vp, micro", ALL_CASES)
def test_schedule_runs_every_op_once_in_order(pp, vp, micro):
    for rank, ops in enumerate(schedules(pp, vp, micro)):
        expected = sorted((c, m) for c in range(vp) for m in range(micro))
        for kind in "FB":
            assert sorted((op.chunk, op.micro) for op in ops if op.kind == kind) == expected, (rank, kind)
        assert len(ops) == 2 * vp * micro
        at = {(op.kind, op.chunk, op.micro): i for i, op in enumerate(ops)}
        for c in range(vp):
            for m in range(micro):
                assert at[("F", c, m)] < at[("B", c, m)], (rank, c, m)


@pytest.mark.parametrize("pp, vp, micro", ALL_CASES)
def test_schedule_completes_without_deadlock(pp, vp, micro):
    simulate(schedules(pp, vp, micro), pp=pp, vp=vp)


@pytest.mark.parametrize("pp, vp, micro", [(2, 1, 3), (4, 1, 2), (2, 2, 2), (3, 3, 5), (4, 2, 1)])
def test_forward_only_schedule_completes(pp, vp, micro):
    """Evaluation runs each rank's forwards alone (micro-batch by micro-batch, chunks in order)."""
    ops = [
        flatten(
            make_schedule(
                Topology(
                    world_size=pp,
                    rank=r,
                    tp=1,
                    pp=pp,
                    dp=1,
                    virtual_stages=vp,
                    sequence_parallel=False,
                    device=torch.device("cpu"),
                ),
                micro,
                forward_only=True,
            )
        )
        for r in range(pp)
    ]
    for rank_ops in ops:
        assert sorted((op.chunk, op.micro) for op in rank_ops) == [(c, m) for c in range(vp) for m in range(micro)]
        assert all(op.kind == "F" for op in rank_ops)
    simulate(ops, pp=pp, vp=vp)


def test_simulator_detects_a_deadlock():
    # Every rank doing all backwards first waits for a backward nobody can send.
    bad = [[Op("B", 0, 0), Op("F", 0, 0)] for _ in range(2)]
    with pytest.raises(Deadlock):
        simulate(bad, pp=2, vp=1)
    # Rank 0 runs both forwards before any backward while rank 1 alternates: rank 0's second
    # send does not wait for rank 1 to receive it, so this completes.
    simulate(
        [
            [Op("F", 0, 0), Op("F", 0, 1), Op("B", 0, 0), Op("B", 0, 1)],
            [Op("F", 0, 0), Op("B", 0, 0), Op("F", 0, 1), Op("B", 0, 1)],
        ],
        pp=2,
        vp=1,
    )


def _bubble(pp: int, vp: int, micro: int) -> float:
    """Idle share of the simulated step, with a chunk's forward costing 1/vp and backward 2/vp
    (the same total work per rank for any vp)."""
    makespan = simulate(schedules(pp, vp, micro), pp=pp, vp=vp, cost=lambda op: (1.0 if op.kind == "F" else 2.0) / vp)
    busy = 3.0 * micro
    return (makespan - busy) / makespan


@pytest.mark.parametrize("pp, micro", [(2, 4), (4, 8), (4, 16)])
def test_bubbles_match_the_textbook(pp, micro):
    """1F1B idles (p-1)/(m+p-1) of the step; interleaving with v chunks cuts the bubble time by v
    (Narayanan et al. 2021): (p-1)/v / (m + (p-1)/v)."""
    assert _bubble(pp, 1, micro) == pytest.approx((pp - 1) / (micro + pp - 1))
    for vp in (2, 4):
        expected = (pp - 1) / vp / (micro + (pp - 1) / vp)
        assert _bubble(pp, vp, micro) == pytest.approx(expected), vp


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("pp, vp", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_stage_owners_name_the_stages_whose_model_holds_each_parameter(flavour, pp, vp):
    """stage_owners (what the offline reshard asks) agrees with the chunks build_model_chunks
    makes from stage_layout: each parameter's owners are exactly the ranks whose GPT has it."""
    from pretrain.models.gpt import GPT
    from pretrain.parallel.model_chunks import stage_layout, stage_owners

    cfg = config(f"model.flavour={flavour}", f"parallel.pipeline={pp}", f"parallel.virtual_stages={vp}")
    held: dict[str, set[int]] = {}
    with torch.device("meta"):
        for rank in range(pp):
            for chunk in range(vp):
                stage = stage_layout(num_layers=cfg.model.num_layers, pp=pp, vp=vp, pp_rank=rank, chunk=chunk)
                for name, _ in GPT(cfg.model, stage=stage).named_parameters():
                    held.setdefault(name, set()).add(rank)
        whole = [name for name, _ in GPT(cfg.model).named_parameters()]
    assert sorted(held) == sorted(whole)
    for name in whole:
        assert stage_owners(name, cfg) == sorted(held[name]), name
