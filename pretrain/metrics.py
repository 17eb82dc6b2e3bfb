"""Throughput, model FLOPs, MFU and memory, and the sinks metrics go to (console, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.hardware import (
    DTYPES,
    cpu_cache_path,
    cpu_hardware,
    detect_hardware,
    measure_matmul_tflops,
    raise_cpu_peak,
)


def training_flops(config: ModelConfig, *, batch: int, seq: int) -> float:
    """Model FLOPs of one forward+backward over `batch` sequences of `seq` tokens.

    Counts matmuls only, without recomputation: 6 x tokens x (matmul weights), plus the
    attention score and value products 12 x batch x s^2 x layers x h, plus the logits. For the
    GPT-2 shape (MHA, ffn = 4h) this is exactly Megatron's 72 B s l h^2 (1 + s/6h + V/12lh);
    for Llama it counts the real GQA and SwiGLU widths instead of assuming that shape. A
    mixture-of-experts block counts its active weights: router, top_k routed and the shared
    experts (model.moe), not all experts.
    """
    h, layers = config.hidden_size, config.num_layers
    attn_weights = (
        h * (config.num_heads + 2 * config.kv_heads) * config.head_dim + config.num_heads * config.head_dim * h
    )
    mlp_weights = layers * h * config.ffn_size * (3 if config.flavour == "llama" else 2)
    if config.moe is not None:  # a MoE block's token meets its active weights only (router, top-k, shared)
        moe_blocks = len(config.moe.layer_ids(layers))
        mlp_weights = mlp_weights * (layers - moe_blocks) // layers + moe_blocks * config.moe.active_mlp_weights(config)
    tokens = batch * seq
    return (
        6 * tokens * (layers * attn_weights + mlp_weights + config.vocab_rows * h) + 12 * batch * seq * seq * layers * h
    )


def megatron_flops(config: ModelConfig, *, batch: int, seq: int) -> float:
    """Megatron-LM's formula 72 B s l h^2 (1 + s/6h + V/12lh), for comparison with its reports."""
    h, layers, vocab = config.hidden_size, config.num_layers, config.vocab_rows
    return 72 * batch * seq * layers * h * h * (1 + seq / (6 * h) + vocab / (12 * layers * h))


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """A measured matmul rate (best of several runs): a second figure next to the datasheet's."""
    return measure_matmul_tflops(device, dtype)


@dataclass
class Peak:
    """The MFU denominator per rank, and where it came from (logged, and written to metrics.jsonl).

    A step's achieved model TFLOP/s is a measured lower bound of the true peak: when it is higher
    than the peak in use (a CPU measured while the machine was busy, a wrong logging.peak_tflops),
    the peak is raised to it, so MFU never exceeds 1."""

    tflops: float
    source: str
    say: Callable[[str], None] | None = None  # the logging rank's console; None elsewhere
    keep: Callable[[float], None] | None = None  # where a raised figure is saved (the CPU cache)
    raised: bool = False
    reported: bool = False  # whether metrics.jsonl has this source yet

    def mfu(self, achieved_tflops: float) -> float:
        if achieved_tflops > self.tflops:
            if not self.raised:  # said once; later raises only move the figure in the records
                if self.say:
                    self.say(
                        f"MFU peak raised from {self.tflops:.4g} to {achieved_tflops:.4g} TFLOP/s, the rate a "
                        f"step achieved: the peak in use ({self.source}) was too low"
                    )
                self.source = f"raised to the rate a step achieved, from {self.tflops:.4g} TFLOP/s: {self.source}"
                self.raised, self.reported = True, False
            self.tflops = achieved_tflops
            if self.keep:
                self.keep(achieved_tflops)
        return achieved_tflops / self.tflops

    def record(self) -> dict:
        """The fields a metrics record carries: the peak always, its source when it is new."""
        fields: dict = {"peak_tflops": self.tflops}
        if not self.reported:
            fields["peak_source"], self.reported = self.source, True
        return fields


def select_peak(
    *, configured: float | None, device: torch.device, precision: str, say: Callable[[str], None] | None = None
) -> Peak:
    """logging.peak_tflops if set; else the datasheet dense peak of the detected GPU (comparable
    across runs and with Megatron-LM and torchtitan); else this CPU's cached measurement, or, on
    a GPU not in the table, a matmul measured now."""
    if configured:
        return Peak(configured, "logging.peak_tflops", say)
    hardware = detect_hardware(device)
    if hardware is not None:
        return Peak(hardware.peak(precision), f"{hardware.description} datasheet", say)
    if device.type == "cpu":
        cpu, keep = cpu_hardware(), partial(raise_cpu_peak, precision)
        source = f"measured on this CPU, {cpu.description} (cached in {cpu_cache_path()})"
        return Peak(cpu.peak(precision), source, say, keep)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return Peak(measure_matmul_tflops(device, DTYPES[precision]), f"matmul measured now on {name} (no datasheet)", say)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def strict_json_value(value):
    """`value` with non-finite floats replaced by None, recursively: strict JSON has no NaN or
    Infinity, and readers such as jq or JSON.parse reject the bare tokens json.dumps writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    return value


def to_json_line(record: dict) -> str:
    """One strict-JSON line (non-finite floats as null)."""
    return json.dumps(strict_json_value(record), allow_nan=False)


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite `path` (atomically) without the records whose step is after `step`: a resumed run
    re-runs those steps, and each step should appear once in the file. Returns how many were
    dropped. A line that does not parse (torn by a crash mid-write) is dropped too, so the file
    stays valid JSON lines."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)  # a crash here leaves either the old or the new file, never half of one
    return dropped


class MetricsLogger:
    """Writes each logged record to the console, `{dir}/metrics.jsonl` and TensorBoard.

    `resume_step`: the step this run starts after (0 for a fresh start); records of later steps in
    an existing metrics.jsonl are dropped first, since this run logs those steps again. A run
    restarted before its first checkpoint thus replaces its own records rather than doubling them."""

    def __init__(
        self, log_dir: str, *, tensorboard: bool = True, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.writer = None
        if not (enabled and log_dir):
            return
        path = Path(log_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "metrics.jsonl"
        if resume_step is not None:
            self._drop_after(resume_step)
        # Append: a resumed run continues the same file.
        self.jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(path / "tensorboard"))

    def _drop_after(self, step: int) -> None:
        dropped = drop_records_after(self.path, step)
        if dropped:
            print(
                f"{self.path}: dropped {dropped} records after step {step} (this run logs those steps again)",
                flush=True,
            )

    def rewind(self, step: int) -> None:
        """Training went back to `step` (a rollback): drop the later records, as a resume does."""
        if self.jsonl:
            self.jsonl.close()
            self._drop_after(step)
            self.jsonl = open(self.path, "a", buffering=1)

    def log(self, record: dict, *, console: str | None = None) -> None:
        if not self.enabled:
            return
        if console:
            print(console, flush=True, file=sys.stdout)
        if self.jsonl:
            self.jsonl.write(to_json_line(record) + "\n")
        if self.writer:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
