"""Training throughput and MFU of a shipped config on one device, on synthetic tokens.

Writes a random-token .bin/.idx (no corpus or tokenizer needed), runs `pretrain.train.run` on
the config for a few dozen steps (no checkpoints, no evaluation) and reports tokens/s, model
TFLOP/s and MFU of the last `--steps - --warmup` steps against a bf16 (or fp32) matmul rate
measured in the same process, and against the GPU's datasheet dense peak
(pretrain/hardware.py: the MFU Megatron-LM and torchtitan report). Variants run one after the
other in this process: eager, then with `model.compile=true`.

    python bench/gpu_train.py                                  # gpt_1.3b, seq 2048, bf16, on CUDA
    python bench/gpu_train.py --device cpu --config configs/gpt_tiny.yaml --micro-batch 2 --steps 6 \\
        --warmup 3 --seq 128                                   # the same code path on a CPU

Last lines: a table, then `RESULT gpu_train_<config>_<variant> tokens_per_s=... mfu=...`
(goal on one H200: gpt_1.3b bf16 at sequence 2048 >= 50% MFU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config
from pretrain.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from pretrain.hardware import datasheet_peak_tflops
from pretrain.metrics import measure_peak_tflops
from pretrain.train import run


def synthetic_data(prefix: Path, *, vocab: int, tokens: int, seed: int = 0) -> None:
    """Random documents of 512-4096 tokens, enough for every sample the run reads."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), dtype=dtype_for_vocab(vocab)) as writer:
        written = 0
        while written < tokens:
            length = int(rng.integers(512, 4096))
            writer.add_document(rng.integers(0, vocab, length))
            written += length


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gpt_1.3b.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the figures")
    p.add_argument("--variants", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.activation_checkpointing=selective")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_peak_tflops(device, dtype)
    datasheet = datasheet_peak_tflops(device, dtype)  # None on a CPU or an unlisted GPU
    name = Path(args.config).stem
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(args.config, [f"model.seq_length={args.seq}"])
        tokens = args.steps * args.micro_batch * args.accumulation * (args.seq + 1) * 2
        synthetic_data(Path(tmp) / "synthetic", vocab=base.model.vocab_size, tokens=tokens)
        for variant in args.variants.split(","):
            overrides = [
                f"model.seq_length={args.seq}",
                f"data.path={tmp}/synthetic",
                "data.tokenizer=",
                "data.split=100,0,0",
                f"train.steps={args.steps}",
                f"train.micro_batch_size={args.micro_batch}",
                f"train.global_batch_size={args.micro_batch * args.accumulation}",
                f"train.precision={args.precision}",
                f"train.device={args.device}",
                f"train.log_interval={args.steps - args.warmup}",
                "train.eval_interval=0",
                "checkpoint.dir=",
                f"logging.dir={tmp}/logs_{variant}",
                "logging.tensorboard=false",
                f"logging.peak_tflops={peak}",
                f"model.compile={'true' if variant == 'compile' else 'false'}",
                *args.overrides,
            ]
            config = load_config(args.config, overrides)
            last = run(config)
            rows.append((variant, last["tokens_per_s"], last["tflops"], last["mfu"], last["peak_mem_bytes"]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    print(
        f"\n{name} seq {args.seq}, micro-batch {args.micro_batch} x {args.accumulation}, {args.precision}, "
        f"{args.device}; measured {args.precision} matmul peak {peak:.1f} TFLOP/s, datasheet "
        + (f"{datasheet:.1f} TFLOP/s" if datasheet else "peak unknown for this device")
    )
    print(f"{'variant':<10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU meas.':>11}{'MFU sheet':>11}{'peak mem GB':>13}")
    for variant, tps, tflops, mfu, mem in rows:
        sheet = f"{tflops / datasheet:.1%}" if datasheet else "-"
        print(f"{variant:<10}{tps:>12,.0f}{tflops:>10.1f}{mfu:>11.1%}{sheet:>11}{mem / 1e9:>13.1f}")
    for variant, tps, tflops, mfu, _ in rows:
        sheet = f" mfu_datasheet={tflops / datasheet:.4f} datasheet_tflops={datasheet:.1f}" if datasheet else ""
        print(
            f"RESULT gpu_train_{name}_{variant} tokens_per_s={tps:.0f} tflops={tflops:.1f} mfu={mfu:.4f} "
            f"peak_tflops={peak:.1f}{sheet}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
