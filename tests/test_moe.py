"""Mixture of experts (issue 19, phase 1): routing and the router losses against plain loops,
dropless dispatch, capacity drops, the sigmoid router's bias update, the figures in the step's
record, tensor/pipeline/data-parallel training equal to one process, resuming at another layout,
and moe_tiny learning with its load figures in metrics.jsonl."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_harness import build_trainer, make_config, run_job, run_ranks

from pretrain.checkpoint import merged_state_dict
from pretrain.config import ConfigError, config_from_dict
from pretrain.config.moe import MoEConfig
from pretrain.metrics import training_flops
from pretrain.models.gpt import GPT
from pretrain.models.moe import MoE
from pretrain.models.moe_routing import load_balancing_loss, plan_dispatch, route, z_loss

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Plain references: one token at a time


def reference_route(logits: torch.Tensor, moe: MoEConfig, bias=None) -> list[list[tuple[int, float]]]:
    """Per token: [(expert, weight)] in choice order, from python sorting."""
    out = []
    for row in logits.tolist():
        if moe.router == "softmax":
            m = max(row)
            exps = [math.exp(v - m) for v in row]
            probs = [v / sum(exps) for v in exps]
            choice = probs
        else:
            probs = [1 / (1 + math.exp(-v)) for v in row]
            choice = probs if bias is None else [p + b for p, b in zip(probs, bias.tolist())]
        top = sorted(range(len(row)), key=lambda e: -choice[e])[: moe.top_k]
        weights = [probs[e] for e in top]
        if moe.normalize_top_k:
            weights = [w / sum(weights) for w in weights]
        out.append(list(zip(top, weights)))
    return out


def reference_losses(logits: torch.Tensor, moe: MoEConfig) -> tuple[float, float]:
    """(Switch load-balancing loss, z-loss) by loops."""
    tokens, experts = logits.shape
    counts, prob_sums, z = [0] * experts, [0.0] * experts, 0.0
    for row, choices in zip(logits.tolist(), reference_route(logits, moe)):
        if moe.router == "softmax":
            m = max(row)
            probs = [math.exp(v - m) for v in row]
        else:
            probs = [1 / (1 + math.exp(-v)) for v in row]
        probs = [p / sum(probs) for p in probs]
        for e in range(experts):
            prob_sums[e] += probs[e]
        for e, _ in choices:
            counts[e] += 1
        z += (max(row) + math.log(sum(math.exp(v - max(row)) for v in row))) ** 2
    aux = experts * sum(counts[e] / (tokens * moe.top_k) * prob_sums[e] / tokens for e in range(experts))
    return aux, z / tokens


def expert_forward(expert, x: torch.Tensor, swiglu: bool) -> torch.Tensor:
    h = expert.fc1(x)
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h, approximate="tanh")
    return expert.fc2(h)


def reference_moe(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The layer's output token by token, and the assignments each expert keeps (first come
    first served up to the capacity)."""
    b, s, h = x.shape
    flat = x.reshape(-1, h)
    logits = flat.float() @ layer.router.weight.float().t()
    bias = getattr(layer.router, "expert_bias", None)
    capacity = layer.moe.capacity(b * s)
    kept = [0] * layer.moe.num_experts
    rows = []
    for t, choices in enumerate(reference_route(logits.detach(), layer.moe, bias)):
        out = torch.zeros(h)
        for e, _ in choices:
            if capacity is not None and kept[e] >= capacity:
                continue
            kept[e] += 1
            scores = torch.softmax(logits[t], -1) if layer.moe.router == "softmax" else torch.sigmoid(logits[t])
            top = torch.tensor([c for c, _ in choices])
            weight = scores[e] / (scores[top].sum() if layer.moe.normalize_top_k else 1.0)
            out = out + weight * expert_forward(layer.experts[str(e)], flat[t], layer.swiglu)
        if layer.shared is not None:
            shared = expert_forward(layer.shared, flat[t], layer.swiglu)
            if layer.shared_gate is not None:
                shared = shared * torch.sigmoid(layer.shared_gate(flat[t]))
            out = out + shared
        rows.append(out)
    return torch.stack(rows).view(b, s, h), kept


def moe_model(flavour: str = "llama", activation_checkpointing: str = "none", **moe) -> GPT:
    model = {"flavour": flavour, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 64}
    model |= {"activation_checkpointing": activation_checkpointing}
    model["moe"] = {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 24, **moe}
    config = config_from_dict({"model": {**model, "seq_length": 16}}).model
    return GPT(config, init_seed=3)


# ------------------------------------------------------------------------------------------------
# Routing and losses


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_routing_and_losses_match_reference_loops(router, normalize):
    moe = MoEConfig(num_experts=6, top_k=2, router=router, normalize_top_k=normalize)
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 2
    bias = torch.linspace(-0.3, 0.3, 6) if router == "sigmoid" else None
    routing = route(logits, moe, bias=bias)
    expected = reference_route(logits, moe, bias)
    assert routing.experts.tolist() == [[e for e, _ in row] for row in expected]
    assert torch.allclose(routing.weights, torch.tensor([[w for _, w in row] for row in expected]), atol=1e-6)
    unbiased = route(logits, moe)
    aux, z = reference_losses(logits, moe)
    received = plan_dispatch(unbiased.experts, 6, capacity=None).received
    assert load_balancing_loss(unbiased, received).item() == pytest.approx(aux, rel=1e-5)
    assert z_loss(logits).item() == pytest.approx(z, rel=1e-5)


def test_balance_loss_is_one_when_balanced_and_experts_when_collapsed():
    moe = MoEConfig(num_experts=4, top_k=1)
    balanced = torch.eye(4).repeat(8, 1) * 1e4  # each token certain of one expert, all experts alike
    routing = route(balanced, moe)
    assert load_balancing_loss(routing, plan_dispatch(routing.experts, 4, capacity=None).received).item() == 1.0
    collapsed = torch.zeros(32, 4)
    collapsed[:, 2] = 1e4
    routing = route(collapsed, moe)
    assert load_balancing_loss(routing, plan_dispatch(routing.experts, 4, capacity=None).received).item() == 4.0


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
@pytest.mark.parametrize("grouped", [True, False])
def test_layer_is_dropless_and_matches_token_by_token(flavour, grouped):
    """Every token reaches its k experts; output and every gradient (the aux and z losses'
    included) equal a token-by-token loop's, by the grouped matmul and by the per-expert loop."""
    gpt = moe_model(flavour, grouped_mm=grouped, shared_experts=1, shared_expert_gate=True, z_loss_coeff=0.1)
    layer = gpt.blocks["1"].mlp
    assert isinstance(layer, MoE) and isinstance(gpt.blocks["0"].mlp, MoE)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    layer.train()
    out = layer(x)
    (out * g).sum().backward()
    assert layer.load.tokens.sum().item() == 16 * 2 and layer.load.dropped.item() == 0
    ours = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None} | {"x": x.grad.clone()}
    layer.zero_grad()
    x.grad = None
    expected, kept = reference_moe(layer, x)
    assert kept == layer.load.tokens.tolist()
    logits = x.reshape(-1, 32) @ layer.router.weight.t()
    aux = load_balancing_loss(route(logits, layer.moe), layer.load.tokens)
    reference_loss = (expected * g).sum() + layer.moe.aux_coeff * aux + 0.1 * z_loss(logits)
    reference_loss.backward()
    assert (out - expected).abs().max().item() < 1e-5
    theirs = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None} | {"x": x.grad}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name


def test_capacity_drops_first_come_first_served_and_counts_them():
    gpt = moe_model(capacity_factor=0.5)  # 16 tokens x 2 / 4 experts x 0.5 = 4 per expert
    layer = gpt.blocks["0"].mlp.train()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = layer(x)
    out.sum().backward()
    expected, kept = reference_moe(layer, x)
    assert kept == [min(4, n) for n in layer.load.tokens.tolist()] and max(kept) == 4
    assert layer.load.dropped.item() == 32 - sum(kept) > 0
    assert (out - expected).abs().max().item() < 1e-5


def test_model_forward_returns_cross_entropy_and_backward_adds_aux():
    """model(tokens, labels) is the cross-entropy alone; its backward carries the aux losses."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 16))
    plain, aux = moe_model(aux_loss_coeff=0.0), moe_model(aux_loss_coeff=10.0)
    loss_plain, loss_aux = plain(tokens, labels=tokens), aux(tokens, labels=tokens)
    assert loss_plain.item() == loss_aux.item()
    loss_plain.backward()
    loss_aux.backward()
    router = "blocks.0.mlp.router.weight"
    grads = [dict(m.named_parameters())[router].grad for m in (plain, aux)]
    assert not torch.allclose(grads[0], grads[1])
    expert = "blocks.1.mlp.experts.1.fc2.weight"  # no aux loss downstream of the last layer's experts
    assert torch.equal(dict(plain.named_parameters())[expert].grad, dict(aux.named_parameters())[expert].grad)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_counts_each_micro_batch_once(mode):
    """A recomputed block routes again in the backward; its gradients are the same and its
    load is recorded once (in the backward of the forward that was kept)."""
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    models = [moe_model(z_loss_coeff=0.1), moe_model(z_loss_coeff=0.1, activation_checkpointing=mode)]
    for model in models:
        model(tokens, labels=tokens).backward()
    plain, recomputed = (dict(m.named_parameters()) for m in models)
    for name, param in plain.items():
        assert torch.allclose(param.grad, recomputed[name].grad, atol=1e-6), name
    for model in models:
        load = model.blocks["0"].mlp.load
        assert load.micro_batches == 1 and load.tokens.sum().item() == 2 * 16 * 2


def test_flops_count_active_experts_only():
    dense = config_from_dict({"model": {"flavour": "llama", "hidden_size": 64, "ffn_hidden_size": 96}}).model
    moe = {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 48, "layer_interval": 2}
    sparse = config_from_dict(
        {"model": {"flavour": "llama", "hidden_size": 64, "ffn_hidden_size": 96, "moe": moe}}
    ).model
    # 2 blocks, the second MoE: top-2 of width 48 = one dense MLP of 96, plus the router 64 x 8.
    assert training_flops(sparse, batch=1, seq=10) - training_flops(dense, batch=1, seq=10) == 6 * 10 * 64 * 8
    total = sum(p.numel() for p in GPT(sparse, init_seed=0).parameters())
    assert total > sum(p.numel() for p in GPT(dense, init_seed=0).parameters()) + 6 * 64 * 48 * 3


def test_config_mistakes_name_the_key():
    base = {"flavour": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4}
    cases = [
        ({"num_experts": 4, "top_k": 5}, [], "model.moe.top_k"),
        ({"layer_interval": 3}, [], "model.moe.layer_interval"),
        ({"shared_ffn_hidden_size": 32}, [], "model.moe.shared_ffn_hidden_size"),
        ({"shared_expert_gate": True}, [], "model.moe.shared_expert_gate"),
        ({"capacity_factor": 0}, [], "model.moe.capacity_factor"),
        ({"ffn_hidden_size": 36}, ["parallel.tensor=8"], "parallel.tensor"),
        ({}, ["parallel.zero_stage=3"], "parallel.zero_stage"),
        ({"router": "top1"}, [], "model.moe.router"),
    ]
    for moe, overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"model": {**base, "moe": moe}}, overrides)
    config = config_from_dict({"model": base}, ["model.moe.num_experts=16", "model.moe.top_k=4"])
    assert (config.model.moe.num_experts, config.model.moe.top_k) == (16, 4)


# ------------------------------------------------------------------------------------------------
# Training: the step's record, the sigmoid bias, layouts


def test_step_record_and_sigmoid_bias_update():
    """One process, 4 micro-batches per step: the record carries the load over the whole global
    batch; the sigmoid bias moves by the rate against the sign of each expert's excess load."""
    config = make_config(
        [
            "model.moe.num_experts=4",
            "model.moe.ffn_hidden_size=32",
            "model.moe.router=sigmoid",
            "model.moe.bias_update_rate=0.01",
        ]
    )
    trainer = build_trainer(config, steps=2)
    biases = lambda: {i: b.mlp.router.expert_bias.detach().clone() for i, b in trainer.chunks[0].blocks.items()}
    assert all(torch.equal(b, torch.zeros(4)) for b in biases().values())
    expected = {i: torch.zeros(4) for i in biases()}
    for step in (1, 2):
        record = trainer.step(step)
        assert {"moe_loss", "moe_aux_loss", "moe_z_loss", "moe_imbalance", "moe_layers"} <= record.keys()
        assert record["moe_loss"] == 0.0  # the sigmoid router balances by its bias alone
        for i, layer in record["moe_layers"].items():
            tokens = torch.tensor(layer["tokens_per_expert"], dtype=torch.float32)
            assert tokens.sum().item() == 8 * 32 * 2  # global batch x seq x top_k: nothing dropped
            assert layer["imbalance"] == pytest.approx(tokens.max().item() / tokens.mean().item())
            expected[i] += 0.01 * torch.sign(tokens.mean() - tokens)
        for i, bias in biases().items():
            assert torch.allclose(bias, expected[i]), (step, i)
    assert any(b.abs().sum() > 0 for b in biases().values())


SOFTMAX = [
    "model.flavour=llama",
    "model.moe.num_experts=4",
    "model.moe.ffn_hidden_size=32",
    "model.moe.aux_loss_coeff=1.0",  # strong, so a wrong aux-loss gradient shows in the norms
    "model.moe.z_loss_coeff=0.1",
    "model.moe.shared_experts=1",
    "model.moe.shared_expert_gate=true",
    "model.moe.grouped_mm=true",  # the grouped matmul (the sigmoid runs take the per-expert loop)
]
SIGMOID = [
    "model.flavour=gpt2",
    "model.moe.grouped_mm=false",  # the per-expert loop
    "model.moe.num_experts=4",
    "model.moe.ffn_hidden_size=32",
    "model.moe.router=sigmoid",
    "model.moe.bias_update_rate=0.05",
    "model.moe.capacity_factor=1.0",
    "model.moe.layer_interval=2",
]
LAYOUTS = {
    "tp2": (["parallel.tensor=2"], 2),
    "tp2-sp": (["parallel.tensor=2", "parallel.sequence_parallel=true"], 2),
    "pp2": (["parallel.pipeline=2"], 2),
    "dp2": ([], 2),
    "tp2-pp2": (["parallel.tensor=2", "parallel.pipeline=2"], 4),
}


def moe_figures(trainer, records: list[dict]) -> dict:
    """What the layout tests compare from a run's step records (tests/test_moe_context.py too)."""
    return {
        "logging": trainer.topo.is_logging_rank,
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "tokens": [[v["tokens_per_expert"] for _, v in sorted(r["moe_layers"].items())] for r in records],
        "aux": [r["moe_aux_loss"] for r in records],
        "z": [r["moe_z_loss"] for r in records],
        "dropped": [r.get("moe_dropped_tokens") for r in records],
    }


def _train(overrides: list[str], steps: int) -> dict:
    trainer = build_trainer(make_config(overrides), steps)
    return moe_figures(trainer, [trainer.step(step) for step in range(1, steps + 1)])


def _layout_run(overrides: list[str], world: int) -> dict:
    if world == 1:
        return _train(overrides, 3)
    (logging,) = [r for r in run_ranks(world, _train, overrides, 3) if r["logging"]]
    return logging


@pytest.fixture(scope="module")
def single_process():
    return {"softmax": _layout_run(SOFTMAX, 1), "sigmoid": _layout_run(SIGMOID, 1)}


@pytest.mark.parametrize(
    "router,layout",
    [("softmax", name) for name in LAYOUTS] + [("sigmoid", name) for name in ("tp2", "tp2-sp", "pp2", "dp2")],
)
def test_layouts_train_as_one_process(single_process, router, layout):
    """3 steps with the optimizer, fp32: losses and grad norms within 2e-5 of one process, the
    same tokens per expert (and drops, and sigmoid bias updates, which steer steps 2 and 3)."""
    extra, world = LAYOUTS[layout]
    ref = single_process[router]
    got = _layout_run((SOFTMAX if router == "softmax" else SIGMOID) + extra, world)
    for key in ("loss", "grad_norm", "aux"):
        assert got[key] == pytest.approx(ref[key], abs=2e-5, rel=0), key
    assert got["tokens"] == ref["tokens"] and got["dropped"] == ref["dropped"]
    if router == "sigmoid":
        assert all(d > 0 for d in ref["dropped"])  # the capacity bites


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_as_one_process(single_process, stage):
    """DeepSpeed's ZeRO-1/2 over DP 2: its gradient hooks see every expert's gradient in every
    micro-batch (experts without tokens run on zero rows), the frozen router bias stays out of
    its optimizer, and the losses are one process's."""
    got = run_job(SIGMOID + [f"parallel.zero_stage={stage}"], world=2)[0]
    ref = single_process["sigmoid"]
    assert got["loss"] == pytest.approx(ref["loss"], abs=2e-5, rel=0)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], abs=2e-5, rel=0)


def test_resume_at_another_layout(tmp_path):
    """Saved by one process after step 2 (expert weights and sigmoid biases), resumed at TP 2 x
    PP 2: step 3 as in the uninterrupted run."""
    overrides = SIGMOID[:-1] + ["model.num_layers=4"]
    straight = run_job(overrides, world=1, last=3, save=str(tmp_path / "ck"), save_at=2)[0]
    saved = merged_state_dict(tmp_path / "ck/step_2")  # keyed by global expert index
    assert {f"blocks.3.mlp.experts.{e}.fc2.weight" for e in range(4)} <= saved.keys()
    assert saved["blocks.3.mlp.router.expert_bias"].abs().sum() > 0
    resumed = run_job(
        overrides + ["parallel.tensor=2", "parallel.pipeline=2"],
        world=4,
        first=3,
        last=3,
        resume=str(tmp_path / "ck/step_2"),
    )[0]
    assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=2e-5, rel=0)
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"][2:], abs=2e-5, rel=0)


def test_moe_tiny_trains_and_logs_the_load(stdlib_data, tmp_path):
    """`python -m pretrain.train configs/moe_tiny.yaml` as a user runs it (40 steps)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            "configs/moe_tiny.yaml",
            "train.steps=40",
            "train.eval_interval=20",
            f"data.path={stdlib_data['prefix']}",
            f"data.tokenizer={stdlib_data['tokenizer']}",
            f"checkpoint.dir={tmp_path}/ckpt",
            f"logging.dir={tmp_path}/logs",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moe aux" in result.stdout and "imbalance" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    for r in train:
        assert r["moe_imbalance"] >= 1.0 and r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        assert sorted(r["moe_layers"]) == ["0", "1", "2", "3"]
        for layer in r["moe_layers"].values():
            assert sum(layer["tokens_per_expert"]) == 8 * 128 * 2  # the step's tokens x top_k: dropless
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 1.5


def test_mixtral_8x7b_config_plans_with_active_flops():
    """The shipped Mixtral shape: 46.7B parameters, 12.9B active; the planner runs its MoE blocks
    on fake tensors (equal load) and finds the 128-GPU layout fits in 80 GB."""
    from pretrain.config import load_config
    from pretrain.hf.mapping import model_params

    model = load_config(ROOT / "configs/mixtral_8x7b.yaml").model
    total = sum(math.prod(shape) for _, shape in model_params(model).values())
    assert round(total / 1e9, 1) == 46.7
    assert model.moe.active_mlp_weights(model) == 4096 * 8 + 2 * 3 * 4096 * 14336  # router, top-2 experts
    active = total - 32 * 6 * 3 * 4096 * 14336  # 6 of the 8 experts idle for each token
    # 6 x active matmul weights per token (the input embedding is a lookup, not a matmul)
    assert training_flops(model, batch=1, seq=1) == pytest.approx(6 * (active - model.vocab_rows * 4096), rel=1e-4)
    result = subprocess.run(
        [sys.executable, "tools/plan.py", "configs/mixtral_8x7b.yaml", "--gpus", "128", "--hardware", "h100", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["plan"]["fits"] is True


def test_bench_moe_row_runs():
    """bench/train_step.py --flavour moe at a toy shape: ours, Mixtral (grouped_mm) and Mixtral's
    loop over experts, equal parameter counts, one RESULT line with both ratios."""
    args = ["--flavour", "moe", "--hidden", "64", "--layers", "1", "--heads", "4", "--seq", "32", "--batch", "1"]
    args += ["--vocab", "200", "--experts", "4", "--steps", "1", "--warmup", "0"]
    result = subprocess.run(
        [sys.executable, "bench/train_step.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert line.startswith("RESULT train_step_moe_fp32_h64 tokens_per_s=") and " ratio_eager=" in line
    assert line.split()[-1].startswith("ratio=")
