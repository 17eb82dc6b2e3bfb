"""The planner's step-time model next to published GPU training throughput.

Each row is a run someone published, with the model shape, layout, batch and GPUs they state,
rebuilt as our config (FSDP, which shards weights, gradients and optimizer state, is our ZeRO-3;
torchtitan's "selective op" recompute is our selective); the planner's tokens/s per GPU is
printed next to the published figure. Sources:
- torchtitan docs/performance.md: Llama 3 8B and 70B on 64 A100 80GB (FSDP, local batch 1,
  sequence 8192): 2,973 and 323 tokens/s per GPU (MFU 58.2%, 50.5%); Llama 3.1 8B on 8 H100
  (96 GB HBM2e at a 500 W power limit, FSDP, local batch 2, selective recompute, no compile):
  5,762 tokens/s per GPU.
- Megatron-Core's performance page: GPT-3 175B on H100 at TP 4 x PP 8 (128-512 GPUs), 390
  model TFLOP/s per GPU (47% MFU). Batch and micro-batch are not stated; the row uses the
  Megatron paper's 175B settings (sequence 2048, global batch 1536, micro-batch 1, sequence
  parallelism, distributed optimizer = ZeRO-1, selective recompute) on 512 GPUs, and the
  published rate is turned into tokens/s with the same FLOPs per token the planner counts.

    python bench/planner_calibration.py

Last lines: `RESULT planner_calibration_<row> estimated=... published=... ratio=<estimated /
published>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config  # noqa: E402
from pretrain.hardware import get_hardware  # noqa: E402
from pretrain.metrics import training_flops  # noqa: E402
from pretrain.planner.suggest import plan  # noqa: E402

LLAMA3_8B = [
    "model.num_layers=32",
    "model.hidden_size=4096",
    "model.num_heads=32",
    "model.num_kv_heads=8",
    "model.ffn_hidden_size=14336",
    "model.vocab_size=128256",
    "model.seq_length=8192",
]
LLAMA3_70B = [
    "model.num_layers=80",
    "model.hidden_size=8192",
    "model.num_heads=64",
    "model.num_kv_heads=8",
    "model.ffn_hidden_size=28672",
    "model.vocab_size=128256",
    "model.seq_length=8192",
]
SELECTIVE = "model.activation_checkpointing=selective"
GPT3_175B = [
    "model.flavour=gpt2",
    "model.num_layers=96",
    "model.hidden_size=12288",
    "model.num_heads=96",
    "model.num_kv_heads=96",
    "model.ffn_hidden_size=49152",
    "model.vocab_size=51200",
    "model.seq_length=2048",
    "model.tie_embeddings=true",
]
MEGATRON = ["parallel.tensor=4", "parallel.pipeline=8", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]
FSDP = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false", "parallel.zero_stage=3"]

# (row, overrides, GPUs, hardware, published tokens/s per GPU, or model TFLOP/s per GPU as "390 TFLOP/s")
ROWS = [
    (
        "megatron_gpt3_175b_512xh100",
        GPT3_175B + MEGATRON + ["train.micro_batch_size=1", "train.global_batch_size=1536", SELECTIVE],
        512,
        "h100",
        "390 TFLOP/s",
    ),
    (
        "torchtitan_llama3_8b_64xa100",
        LLAMA3_8B + FSDP + ["train.micro_batch_size=1", "train.global_batch_size=64", SELECTIVE],
        64,
        "a100-80gb",
        2973,
    ),
    (
        "torchtitan_llama3_70b_64xa100",
        LLAMA3_70B
        + FSDP
        + ["train.micro_batch_size=1", "train.global_batch_size=64", "model.activation_checkpointing=full"],
        64,
        "a100-80gb",
        323,
    ),
    (
        "torchtitan_llama31_8b_8xh100_500w",
        LLAMA3_8B + FSDP + ["train.micro_batch_size=2", "train.global_batch_size=16", SELECTIVE],
        8,
        "h100",
        5762,
    ),
]


def _tokens_per_s(published, config) -> float:
    """A published rate as tokens/s per GPU ("390 TFLOP/s": model FLOPs per GPU per second)."""
    if isinstance(published, str):
        tflops = float(published.split()[0])
        per_token = training_flops(config.model, batch=1, seq=config.model.seq_length) / config.model.seq_length
        return tflops * 1e12 / per_token
    return published


def main() -> None:
    print(f"{'run':<36}{'GPUs':>6}{'estimated':>12}{'published':>12}{'ratio':>8}{'est. MFU':>10}")
    results = []
    for name, overrides, gpus, hardware, published in ROWS:
        config = load_config(ROOT / "configs" / "llama_1b.yaml", overrides)
        step = plan(config, gpus, get_hardware(hardware)).step
        published = _tokens_per_s(published, config)
        ratio = step.tokens_per_s_per_gpu / published
        print(
            f"{name:<36}{gpus:>6}{step.tokens_per_s_per_gpu:>12,.0f}{published:>12,.0f}{ratio:>8.2f}{step.mfu:>10.1%}"
        )
        results.append((name, step.tokens_per_s_per_gpu, published, ratio))
    for name, estimated, published, ratio in results:
        figures = f"estimated={estimated:.0f} published={published:.0f} ratio={ratio:.2f}"
        print(f"RESULT planner_calibration_{name} {figures}")


if __name__ == "__main__":
    main()
