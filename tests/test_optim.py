"""Learning-rate schedule, parameter groups and gradient clipping."""

import math

import pytest
import torch

from pretrain.config import OptimizerConfig, ScheduleConfig, config_from_dict
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer, learning_rate
from pretrain.parallel.data import clip_gradients, global_grad_norm
from pretrain.parallel.topology import single_process

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def lr(step, total=110, **schedule):
    return learning_rate(step, optim=OPT, schedule=ScheduleConfig(**schedule), total_steps=total)


def test_linear_warmup_then_cosine():
    assert lr(1, warmup_steps=10) == pytest.approx(0.1)
    assert lr(5, warmup_steps=10) == pytest.approx(0.5)
    assert lr(10, warmup_steps=10) == pytest.approx(1.0)
    # Halfway through the decay the cosine is at the midpoint between lr and min_lr.
    assert lr(60, warmup_steps=10) == pytest.approx(0.55)
    assert lr(110, warmup_steps=10) == pytest.approx(0.1)
    assert lr(500, warmup_steps=10) == pytest.approx(0.1)  # stays at min_lr after decay_steps
    values = [lr(s, warmup_steps=10) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_shape():
    for step in (20, 35, 80):
        progress = (step - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr(step, warmup_steps=10) == pytest.approx(expected)


def test_linear_and_constant_and_decay_steps():
    assert lr(60, warmup_steps=10, decay="linear") == pytest.approx(0.55)
    assert lr(35, warmup_steps=10, decay="linear", decay_steps=60) == pytest.approx(0.55)
    assert lr(60, decay="linear", decay_steps=60) == pytest.approx(0.1)
    assert lr(1000, warmup_steps=10, decay="constant") == 1.0
    assert lr(1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 110)))  # no warmup


def test_no_weight_decay_on_biases_and_norms():
    model = GPT(
        config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 100}}).model
    )
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "blocks.0.attn.qkv.bias",
        "blocks.0.norm1.weight",
        "final_norm.bias",
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def grad_norm_and_clip(params, *, max_norm, topo):
    norm = global_grad_norm(params, topo=topo)
    clip_gradients(params, norm=norm, max_norm=max_norm)
    return norm


def test_clip_returns_norm_before_clipping():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert grad_norm_and_clip(params, max_norm=1.0, topo=single_process()) == pytest.approx(5.0)
    total = torch.cat([p.grad for p in params]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)
    assert grad_norm_and_clip(params, max_norm=0.0, topo=single_process()) == pytest.approx(
        1.0, rel=1e-5
    )  # 0 disables clipping
