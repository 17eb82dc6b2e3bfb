"""A model built on the meta device and materialised parameter by parameter
(pretrain/models/build.py) is the model GPT(...) builds: same names, values, attributes."""

import types

import pytest
import torch

from pretrain.config import config_from_dict
from pretrain.models.build import build_gpt
from pretrain.models.gpt import GPT, Stage
from pretrain.parallel.tensor import TensorParallelLayers
from pretrain.strategy import weight_dtype

MODELS = {
    "llama": {
        "flavour": "llama",
        "num_layers": 3,
        "hidden_size": 64,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vocab_size": 300,
        "seq_length": 32,
    },
    "gpt2": {
        "flavour": "gpt2",
        "num_layers": 3,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 300,
        "seq_length": 32,
    },
}


def tp_layers(rank: int, *, sequence_parallel: bool = True) -> TensorParallelLayers:
    """The TP factory of rank `rank` of 2; building its modules needs no process group."""
    topo = types.SimpleNamespace(tp=2, tp_rank=rank, tp_group=None, sequence_parallel=sequence_parallel, cp=1)
    return TensorParallelLayers(topo)


def assert_same_model(built: GPT, reference: GPT, dtype: torch.dtype) -> None:
    ref = dict(reference.named_parameters())
    assert list(dict(built.named_parameters())) == list(ref)
    for name, param in built.named_parameters():
        assert not param.is_meta and param.dtype == dtype and param.requires_grad, name
        assert torch.equal(param, ref[name].detach().to(dtype)), name
        assert vars(param) == vars(ref[name]), name  # the sharding facts (pretrain/models/sharding.py)
    buffers = dict(reference.named_buffers())
    for name, buffer in built.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("flavour", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_built_on_meta_equals_gpt(flavour, dtype):
    config = config_from_dict({"model": MODELS[flavour]}).model
    assert_same_model(build_gpt(config, init_seed=7, dtype=dtype), GPT(config, init_seed=7), dtype)


@pytest.mark.parametrize("flavour", sorted(MODELS))
def test_pipeline_chunks_and_tensor_parallel_shards(flavour):
    config = config_from_dict({"model": {**MODELS[flavour], "tie_embeddings": True}}).model
    for stage in (Stage(range(0, 1), first=True, last=False), Stage(range(1, 3), first=False, last=True)):
        for rank in range(2):
            built = build_gpt(config, init_seed=3, layers=tp_layers(rank), stage=stage, dtype=torch.bfloat16)
            assert_same_model(built, GPT(config, init_seed=3, layers=tp_layers(rank), stage=stage), torch.bfloat16)


def test_default_device_is_the_ambient_one_and_the_forward_runs():
    config = config_from_dict({"model": MODELS["llama"]}).model
    with torch.device("cpu"):
        model = build_gpt(config, init_seed=1)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, labels=tokens)
    loss.backward()
    reference = GPT(config, init_seed=1)
    assert loss.item() == reference(tokens, labels=tokens).item()
    with torch.device("meta"):  # still a shapes-only model where one was asked for
        assert all(p.is_meta for p in build_gpt(config, init_seed=1).parameters())


def test_weights_are_16_bit_only_under_zero():
    def dtype(**train_parallel):
        return weight_dtype(config_from_dict({"model": MODELS["gpt2"], **train_parallel}))

    assert dtype(train={"precision": "bf16"}) == torch.float32  # our AdamW trains fp32 weights
    assert dtype(train={"precision": "bf16"}, parallel={"zero_stage": 1}) == torch.bfloat16
    assert dtype(train={"precision": "fp16"}, parallel={"zero_stage": 2}) == torch.float16
    assert dtype(train={"precision": "fp32"}, parallel={"zero_stage": 1}) == torch.float32


def test_model_build_bench_runs_small():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "bench/model_build.py", "--layers", "1", "--hidden", "128", "--vocab", "500"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT model_build params_m=" in out.stdout
