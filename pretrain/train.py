"""The training loop: `python -m pretrain.train CONFIG.yaml [section.key=value ...]`.

The loop is thin on purpose: build (data, model, optimizer), resume, then per step run the
micro-batches, clip, step, and hand off to logging, evaluation and checkpointing beside it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pretrain.checkpoint import (find_resume_checkpoint, load_checkpoint,
                                 prune_checkpoints, read_meta, save_checkpoint)
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.loader import SampleLoader
from pretrain.data.tokenizer import load_tokenizer
from pretrain.metrics import MetricsLogger, measure_peak_tflops, peak_memory_bytes, training_flops
from pretrain.models.gpt import GPT
from pretrain.optim import build_optimizer, clip_gradients, learning_rate, set_learning_rate


@dataclass
class Data:
    train: SampleLoader
    valid: GPTDataset | None


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch sees no GPU")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def build_data(config: RunConfig, *, consumed_samples: int = 0) -> Data:
    """Open the dataset named by data.path and check it against the tokenizer and the model."""
    d, m = config.data, config.model
    parts = d.path.split()
    if not parts:
        raise ConfigError("data.path: no dataset given; run `bash launch/quickstart.sh` to build one, "
                          "or set data.path=PREFIX (for PREFIX.bin/.idx)")
    if len(parts) > 1:
        raise ConfigError(f"data.path: blending several datasets ({d.path!r}) is not supported yet; "
                          "give one prefix")
    prefix = parts[0]
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(f"data.path: {prefix}{suffix} does not exist (data.path is the prefix "
                              "written by tools/preprocess_data.py, without .bin/.idx)")
    if d.tokenizer:
        vocab = load_tokenizer(d.tokenizer).vocab_size
        if vocab > m.vocab_size:
            raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({vocab} in {d.tokenizer}); set model.vocab_size={vocab}")
    seq, seed = m.seq_length, config.train.seed
    train = GPTDataset(prefix, seq_length=seq, split="train", split_ratios=d.split_ratios, seed=seed)
    valid = None
    if d.split_ratios[1] > 0:
        valid = GPTDataset(prefix, seq_length=seq, split="valid", split_ratios=d.split_ratios, seed=seed)
    loader = SampleLoader(train, micro_batch_size=config.train.micro_batch_size, seed=seed,
                          consumed_samples=consumed_samples)
    return Data(train=loader, valid=valid)


def accumulation_steps(config: RunConfig, *, data_parallel: int) -> int:
    t = config.train
    per_step = t.micro_batch_size * data_parallel
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError(f"train.global_batch_size: {global_batch} is not divisible by "
                          f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x "
                          f"{data_parallel}")
    return global_batch // per_step


def train_step(model: GPT, batches: Iterator[dict], *, accum: int, device: torch.device,
               autocast) -> float:
    """Forward/backward over `accum` micro-batches; gradients are the mean over all of them."""
    total = 0.0
    for _ in range(accum):
        batch = next(batches)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        with autocast():
            loss = model(tokens, labels=labels)
        (loss / accum).backward()
        total += loss.item()
    return total / accum


@torch.no_grad()
def evaluate(model: GPT, dataset: GPTDataset, config: RunConfig, *, device, autocast) -> float:
    """Mean loss over the first train.eval_iters validation micro-batches (the same each time)."""
    model.eval()
    loader = SampleLoader(dataset, micro_batch_size=config.train.micro_batch_size, seed=config.train.seed)
    iters = min(config.train.eval_iters, max(1, len(dataset) // config.train.micro_batch_size))
    losses = []
    for _ in range(iters):
        batch = next(loader)
        with autocast():
            losses.append(model(batch["tokens"].to(device), labels=batch["labels"].to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def run(config: RunConfig) -> dict:
    """Train as configured; returns the last logged record."""
    t, ck = config.train, config.checkpoint
    device = pick_device(t.device)
    accum = accumulation_steps(config, data_parallel=1)
    resume_from = find_resume_checkpoint(ck.dir, ck.resume)
    # Data first: a missing or mismatched dataset should fail before a model is built.
    consumed = read_meta(resume_from)["train_state"]["consumed_samples"] if resume_from else 0
    data = build_data(config, consumed_samples=consumed)
    batches = iter(data.train)

    torch.manual_seed(t.seed)
    model = GPT(config.model).to(device)
    optimizer = build_optimizer(model, config.optimizer)
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, model=model, optimizer=optimizer, config=config)["step"]
        print(f"resumed from {resume_from} at step {step}", flush=True)

    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")  # noqa: E731
    peak = config.logging.peak_tflops or measure_peak_tflops(device, dtype)
    global_batch = t.micro_batch_size * accum
    step_flops = training_flops(config.model, batch=global_batch, seq=config.model.seq_length)
    logger = MetricsLogger(config.logging.dir, tensorboard=config.logging.tensorboard)
    print(f"model: {config.model.flavour}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{config.model.num_layers} layers, hidden {config.model.hidden_size}; global batch "
          f"{global_batch} x {config.model.seq_length} tokens ({accum} accumulation steps); "
          f"{device.type}, {t.precision}, peak {peak:.2f} TFLOP/s for MFU", flush=True)

    def save(step_now: int) -> None:
        if not ck.dir:
            return
        path = save_checkpoint(ck.dir, step=step_now, model=model, optimizer=optimizer, config=config,
                               train_state={"consumed_samples": data.train.consumed_samples})
        prune_checkpoints(ck.dir, keep_last=ck.keep_last)
        print(f"saved checkpoint {path}", flush=True)

    def run_eval(step_now: int) -> dict:
        val = evaluate(model, data.valid, config, device=device, autocast=autocast)
        record = {"step": step_now, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        logger.log(record, console=f"step {step_now:>6} | validation loss {val:.4f} | "
                                   f"perplexity {record['val_ppl']:.2f}")
        return record

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    start_time = time.perf_counter()
    # Throughput counts step time only: evaluation and checkpoint time are not training speed.
    interval_time, interval_steps, last = 0.0, 0, {}
    saved_at = evaluated_at = step
    if data.valid is not None and t.eval_interval and step == 0:
        run_eval(0)  # the baseline the validation curve starts from
    while step < t.steps:
        step += 1
        step_start = time.perf_counter()
        lr = learning_rate(step, optim=config.optimizer, schedule=config.schedule, total_steps=t.steps)
        set_learning_rate(optimizer, lr)
        loss = train_step(model, batches, accum=accum, device=device, autocast=autocast)
        grad_norm = clip_gradients(model.parameters(), config.optimizer.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        interval_time += time.perf_counter() - step_start
        interval_steps += 1
        if step % t.log_interval == 0 or step == t.steps:
            elapsed = interval_time / interval_steps
            tflops = step_flops / elapsed / 1e12
            last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": global_batch * config.model.seq_length / elapsed,
                    "tflops": tflops, "mfu": tflops / peak, "step_time_s": elapsed,
                    "consumed_samples": data.train.consumed_samples,
                    "peak_mem_bytes": peak_memory_bytes(device)}
            logger.log(last, console=(
                f"step {step:>6}/{t.steps} | loss {loss:.4f} | lr {lr:.3e} | grad {grad_norm:.3f} | "
                f"{last['tokens_per_s']:,.0f} tok/s | {tflops:.3f} TFLOP/s | MFU {100 * last['mfu']:.1f}% | "
                f"mem {last['peak_mem_bytes'] / 2**30:.2f} GiB"))
            interval_time, interval_steps = 0.0, 0
        if data.valid is not None and t.eval_interval and step % t.eval_interval == 0:
            run_eval(step)
            evaluated_at = step
        if ck.interval and step % ck.interval == 0:
            save(step)
            saved_at = step
        if t.exit_after_minutes and time.perf_counter() - start_time > 60 * t.exit_after_minutes:
            print(f"train.exit_after_minutes={t.exit_after_minutes} reached at step {step}", flush=True)
            break

    if data.valid is not None and evaluated_at != step:
        last = {**last, **run_eval(step)}
    if saved_at != step:
        save(step)
    logger.close()
    return last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        config = load_config(argv[0], argv[1:])
        run(config)
    except ValueError as e:  # ConfigError, CheckpointError, dataset errors: user mistakes
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
