"""The training loop: `python -m pretrain.train CONFIG.yaml [section.key=value ...]`.

The same command trains on one process or, under torchrun/srun/mpirun, on a TP x PP x DP grid.
The loop is thin on purpose: build (topology, data, model, optimizer), resume, then per step
run the schedule, synchronise gradients, clip, step; logging, evaluation and checkpointing
plug in beside it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    checkpoint_candidates,
    find_resume_checkpoint,
    load_newest_intact,
)
from pretrain.checkpoint.fallback import first_readable, step_of
from pretrain.checkpoint.guard import check_no_overwrite, run_lock
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.data.blend import parse_data_path
from pretrain.data.builder import build_datasets
from pretrain.data.loader import SampleDataset, SampleLoader, causal_lm_collate, with_document_segments
from pretrain.data.masking import MaskedLMCollator
from pretrain.data.tokenizer import load_tokenizer
from pretrain.device import pick_device
from pretrain.faults.divergence import Diverged, DivergenceGuard
from pretrain.faults.stragglers import StragglerMeter
from pretrain.faults.watchdog import Watchdog
from pretrain.launch import discover
from pretrain.metrics import MetricsLogger, measure_peak_tflops, peak_memory_bytes, training_flops
from pretrain.models.attention import check_backend
from pretrain.models.build import weight_dtype
from pretrain.optim import (
    BackwardRootChunk,
    DynamicLossScaler,
    build_optimizer,
    learning_rate,
    set_learning_rate,
    unscale_and_check,
)
from pretrain.parallel.data import GradientSync, clip_gradients, global_grad_norm, reduce_loss, shared_loss
from pretrain.parallel.pipeline import build_model_chunks, forward_backward
from pretrain.parallel.topology import Topology, init_distributed, validate_layout
from pretrain.parallel.waits import waiting
from pretrain.parallel.zero import require_deepspeed
from pretrain.stopping import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_RESUMABLE, StopRequests


@dataclass
class Data:
    train: SampleLoader
    valid: SampleDataset | None
    collate: Callable | None


def check_data(config: RunConfig):
    """Check data.path and the tokenizer against the model; returns the tokenizer (or None)."""
    d, m = config.data, config.model
    if not d.path:
        raise ConfigError(
            "data.path: no dataset given; run `bash launch/quickstart.sh` to build one, "
            "or set data.path=PREFIX (for PREFIX.bin/.idx) or 'w1 PREFIX1 w2 PREFIX2 ...'"
        )
    for _, prefix in parse_data_path(d.path):
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(
                    f"data.path: {prefix}{suffix} does not exist (data.path names prefixes "
                    "written by tools/preprocess_data.py, without .bin/.idx)"
                )
    tokenizer = load_tokenizer(d.tokenizer) if d.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} in {d.tokenizer}); set model.vocab_size={tokenizer.vocab_size}"
        )
    if d.objective == "masked" and tokenizer is None:
        raise ConfigError("data.tokenizer: the masked objective needs the tokenizer (for its mask token)")
    return tokenizer


def build_data(config: RunConfig, topo: Topology, *, consumed_samples: int, tokenizer=None) -> Data:
    """Megatron-ordered datasets (indices built on rank 0, cached, memory-mapped by the others)
    and this DP rank's loader."""
    t, d = config.train, config.data
    tokenizer = tokenizer or check_data(config)
    global_batch = t.global_batch_size or t.micro_batch_size * topo.dp
    datasets = build_datasets(
        d.path,
        seq_length=config.model.seq_length,
        seed=t.seed,
        split_ratios=d.split_ratios,
        num_samples={
            "train": t.steps * global_batch,
            "valid": t.eval_iters * t.micro_batch_size * topo.dp if t.eval_interval else 0,
        },
        cache_dir=d.cache_dir or None,
        is_builder=topo.rank == 0,
        barrier=dist.barrier if topo.world_size > 1 else None,
    )
    collate = None
    if d.objective == "masked":
        collate = MaskedLMCollator(
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask,
            seed=t.seed,
            special_ids=(tokenizer.eod, tokenizer.pad),
            mask_prob=d.mask_prob,
            mean_span=d.mean_span,
        )
    if d.document_attention_mask:
        collate = with_document_segments(collate or causal_lm_collate, tokenizer.eod)
    loader = SampleLoader(
        datasets["train"],
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        consumed_samples=consumed_samples,
        collate=collate,
        vocab_size=config.model.vocab_size,
    )
    return Data(train=loader, valid=datasets["valid"], collate=collate)


def accumulation_steps(config: RunConfig, *, data_parallel: int) -> int:
    t = config.train
    per_step = t.micro_batch_size * data_parallel
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size: {global_batch} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x "
            f"{data_parallel}"
        )
    return global_batch // per_step


class Trainer:
    """What one step needs, built once; `step()` and `evaluate()` are the loop's two verbs.

    Without ZeRO: our AdamW, our bucketed DP reduction, our clipping (and, in fp16, our dynamic
    loss scaler). With parallel.zero_stage > 0 a ZeroEngine owns all four (DeepSpeed's ZeRO
    optimizer); the schedule, data and loss are the same code either way."""

    def __init__(
        self,
        config: RunConfig,
        topo: Topology,
        chunks: list,
        *,
        train_batches: Iterator[dict],
        valid: SampleDataset | None = None,
        collate: Callable | None = None,
    ) -> None:
        self.config, self.topo, self.chunks, self.valid, self.collate = config, topo, chunks, valid, collate
        self.batches = train_batches
        # Told each operation as it starts (the hang watchdog's beat); run() sets it.
        self.progress: Callable[[str], None] = lambda operation: None
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.num_params = sum(p.numel() for p in self.params)  # before ZeRO-3 partitions them
        self.accum = accumulation_steps(config, data_parallel=topo.dp)
        self.zero, self.grad_sync, self.scaler = None, None, None
        precision = config.train.precision
        if config.parallel.zero_stage:
            from pretrain.parallel.zero import ZeroEngine  # imports deepspeed

            self.zero = ZeroEngine(config, topo, chunks, accumulation=self.accum)
            self.optimizer = self.zero.optimizer
            self.schedule_chunks = self.zero.chunks
        else:
            self.optimizer = build_optimizer(self.params, config.optimizer)
            self.grad_sync = GradientSync(chunks, topo, bucket_mb=config.parallel.bucket_mb)
            self.schedule_chunks = chunks
            if precision == "fp16":
                self.scaler = DynamicLossScaler()
                self.schedule_chunks = [BackwardRootChunk(c, scale=lambda: self.scaler.scale) for c in chunks]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        device_type = topo.device.type
        self.autocast = lambda: torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        seq = config.model.seq_length // (topo.tp if topo.sequence_parallel else 1)
        self.hidden_shape = (config.train.micro_batch_size, seq, config.model.hidden_size)
        self.hidden_dtype = dtype or torch.float32  # what activations travel in between stages
        self.guard = DivergenceGuard(config.faults)

    def step(self, step: int) -> dict:
        """One optimizer step, or a skipped one: `bad_step` says why (every rank judges the same
        loss and gradient norm, so all skip together)."""
        c = self.config
        lr = learning_rate(step, optim=c.optimizer, schedule=c.schedule, total_steps=c.train.steps)
        losses = forward_backward(
            chunks=self.schedule_chunks,
            topo=self.topo,
            batches=self.batches,
            progress=self.progress,
            micro_batches=self.accum,
            autocast=self.autocast,
            hidden_shape=self.hidden_shape,
            hidden_dtype=self.hidden_dtype,
            on_last_backward=self.zero.on_last_backward if self.zero else self.grad_sync.enable,
        )
        self.progress("optimizer")
        loss = shared_loss(losses, self.topo)
        problem = self.guard.loss_problem(loss)
        if self.zero:
            record = self.zero.step(lr, skip=problem is not None)
            if problem is None and record["skipped"] and c.train.precision != "fp16":
                problem = self.guard.norm_problem(record["grad_norm"])  # DeepSpeed found non-finite gradients
        else:
            record = self._step(lr, problem)
            problem = record.pop("problem")
        self.guard.record(loss, problem)
        if c.train.precision == "fp16":
            record["loss_scale"] = float(self.zero.optimizer.loss_scale if self.zero else self.scaler.scale)
        else:
            record.pop("skipped")
        return {"loss": loss, "lr": lr, **record, "bad_step": problem, "skipped_steps": self.guard.skipped_total}

    def _step(self, lr: float, problem: str | None) -> dict:
        """Our own optimizer step; `problem`: the loss already condemned the step."""
        set_learning_rate(self.optimizer, lr)
        self.grad_sync.finish()
        overflow = False
        if self.scaler is not None:  # every rank agrees on skipping (unscale_and_check reduces)
            overflow = unscale_and_check(self.params, scale=self.scaler.scale)
            self.scaler.update(overflow)  # raises Diverged at the minimum scale
        grad_norm = math.inf
        if not overflow:
            grad_norm = global_grad_norm(self.params, topo=self.topo)
            problem = problem or self.guard.norm_problem(grad_norm)
            if problem is None:
                clip_gradients(self.params, norm=grad_norm, max_norm=self.config.optimizer.clip_grad)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "skipped": overflow, "problem": problem}

    def weights_finite(self) -> bool:
        """Whether every rank's weights are finite (collective): checked before each save, so that
        no checkpoint is ever published with NaN or Inf in it."""
        local = self.zero.weights_finite() if self.zero else all(bool(p.isfinite().all()) for p in self.params)
        flag = torch.tensor([float(local)], device=self.topo.device)
        if self.topo.world_size > 1:
            with waiting():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train_state(self) -> dict:
        """What the trainer itself must carry across a resume (saved in meta.json): the divergence
        guard's loss history and counts; the fp16 loss scaler, ours or DeepSpeed's (equal on
        every rank: overflow decisions are global)."""
        state = {"guard": self.guard.state_dict()}
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        if self.zero is not None and self.config.train.precision == "fp16":
            state["zero_loss_scaler"] = self.zero.loss_scaler_state()
        return state

    def load_train_state(self, state: dict, *, rollback: bool = False) -> None:
        """`rollback`: going back to an older checkpoint keeps the rollbacks already used."""
        self.guard.load_state_dict(state.get("guard", {}), keep_rollbacks=rollback)
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        if self.zero is not None and "zero_loss_scaler" in state:
            self.zero.load_loss_scaler_state(state["zero_loss_scaler"])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first train.eval_iters validation micro-batches of each DP rank
        (the same ones every time, so evaluations are comparable)."""
        t = self.config.train
        for chunk in self.chunks:
            chunk.eval()
        loader = SampleLoader(
            self.valid,
            micro_batch_size=t.micro_batch_size,
            seed=t.seed,
            dp_rank=self.topo.dp_rank,
            dp_size=self.topo.dp,
            collate=self.collate,
            vocab_size=self.config.model.vocab_size,
        )
        iters = min(t.eval_iters, max(1, len(self.valid) // (t.micro_batch_size * self.topo.dp)))
        losses = forward_backward(
            chunks=self.chunks,
            topo=self.topo,
            batches=iter(loader),
            micro_batches=iters,
            progress=lambda operation: self.progress(f"evaluation: {operation}"),
            autocast=self.autocast,
            hidden_shape=self.hidden_shape,
            hidden_dtype=self.hidden_dtype,
            forward_only=True,
        )
        for chunk in self.chunks:
            chunk.train()
        return reduce_loss(torch.stack(losses).mean(), self.topo) if losses else math.nan


def run(config: RunConfig, *, launch=None) -> dict:
    """Train as configured; returns the last record logged (on the logging rank), with
    `stopped` set to the reason when a signal or train.exit_after_minutes ended it early.
    `launch`: this process's place in the job (pretrain.launch.discover() when not given)."""
    t, ck = config.train, config.checkpoint
    # Everything a user can get wrong is checked before any process group starts.
    launch = launch or discover()
    validate_layout(config, launch.world_size)
    tokenizer = check_data(config)
    device = pick_device(t.device, local_rank=launch.local_rank, local_world_size=launch.local_world_size)
    check_backend(config.model.attention_backend, device)
    require_deepspeed(config)
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if launch.rank == 0 else None
    resume_from = find_resume_checkpoint(ck.dir, ck.resume, warn=say)
    resume_meta = None
    if resume_from is not None:  # a checkpoint whose meta.json is damaged gives way to the one before
        chosen = resume_from
        candidates, resume_meta = first_readable(checkpoint_candidates(ck.dir, resume_from), warn=say)
        resume_from = candidates[0]
        # Measured from the checkpoint chosen first: a damaged newer one may be saved over.
        check_no_overwrite(ck.dir, start_step=step_of(chosen, resume_meta))
    else:
        check_no_overwrite(ck.dir, start_step=0)
    consumed = resume_meta["train_state"].get("consumed_samples") if resume_meta else 0
    if consumed is None:  # weights-only tools may write checkpoints without a data position
        raise CheckpointError(
            f"{resume_from}/meta.json has no train_state.consumed_samples: it does not say "
            "where in the data to continue; resume from a checkpoint a training run saved"
        )
    topo = init_distributed(config, device=device, launch=launch)
    # From here on every wait is bounded: collectives by parallel.timeout_minutes, everything
    # else (index building, model building, checkpoint loading, steps) by the watchdog.
    with Watchdog(timeout_s=60 * t.hang_timeout_minutes, rank=topo.rank, log_dir=config.logging.dir) as watchdog:
        return fit(
            config, topo, watchdog=watchdog, resume_from=resume_from, consumed=consumed, tokenizer=tokenizer, say=say
        )


def fit(
    config: RunConfig,
    topo: Topology,
    *,
    watchdog: Watchdog,
    resume_from: Path | None,
    consumed: int,
    tokenizer,
    say: Callable[[str], None] | None,
) -> dict:
    """run() once the process groups are up: build, resume, loop."""
    t, ck, device = config.train, config.checkpoint, topo.device
    # Data first: a missing or mismatched dataset should fail before a model is built.
    watchdog.beat("building the datasets")
    data = build_data(config, topo, consumed_samples=consumed, tokenizer=tokenizer)

    watchdog.beat("building the model")
    # Dropout streams: equal across TP and DP ranks, different per pipeline stage.
    torch.manual_seed(t.seed + 100 * topo.pp_rank)
    chunks = build_model_chunks(config.model, topo, init_seed=t.seed, dtype=weight_dtype(config))
    trainer = Trainer(config, topo, chunks, train_batches=iter(data.train), valid=data.valid, collate=data.collate)
    trainer.progress = watchdog.beat
    if trainer.zero is not None and topo.rank == 0:
        print(f"DeepSpeed config: {json.dumps(trainer.zero.ds_config)}", flush=True)
    step = 0
    if resume_from is not None:  # a damaged checkpoint falls back to the one before it
        watchdog.beat(f"loading {resume_from}")
        resumed, meta = load_newest_intact(
            checkpoint_candidates(ck.dir, resume_from),
            model=chunks,
            optimizer=trainer.optimizer,
            config=config,
            topo=topo,
            zero=trainer.zero,
            warn=say,
        )
        step = meta["step"]
        trainer.load_train_state(meta["train_state"])
        data.train.consumed_samples = meta["train_state"].get("consumed_samples", consumed)  # a fallback's
        if topo.rank == 0:
            print(f"resumed from {resumed} at step {step}", flush=True)

    logging_rank = topo.is_logging_rank
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    peak = config.logging.peak_tflops or measure_peak_tflops(device, dtype)
    global_batch = t.micro_batch_size * trainer.accum * topo.dp
    speed = Throughput(
        tokens_per_step=global_batch * config.model.seq_length,
        peak_tflops=peak,
        flops_per_step=training_flops(config.model, batch=global_batch, seq=config.model.seq_length),
        world_size=topo.world_size,
    )
    # resume_step: steps after it are (re)run here, so their old records in metrics.jsonl go.
    logger = MetricsLogger(
        config.logging.dir, tensorboard=config.logging.tensorboard, enabled=logging_rank, resume_step=step
    )
    if logging_rank:
        params = trainer.num_params
        print(
            f"model: {config.model.flavour}, {config.model.num_layers} layers, hidden "
            f"{config.model.hidden_size}, {params / 1e6:.2f}M parameters on this rank; {topo.describe()}; "
            f"global batch {global_batch} x {config.model.seq_length} tokens ({trainer.accum} micro-batches "
            f"per rank); {device.type}, {t.precision}, peak {peak:.2f} TFLOP/s per rank for MFU",
            flush=True,
        )

    saver = Checkpointer(ck.dir, config, topo) if ck.dir else None

    def save(step_now: int) -> bool:
        """Write step_now's checkpoint; False, and nothing written, when the weights are not
        finite (a NaN checkpoint must never become `latest`)."""
        if saver is None:
            return True
        trainer.progress(f"checkpoint save of step {step_now}")
        if not trainer.weights_finite():
            return False
        train_state = {"consumed_samples": data.train.consumed_samples, **trainer.train_state()}
        path = saver.save(
            step_now,
            model=chunks,
            optimizer=None if trainer.zero else trainer.optimizer,
            zero=trainer.zero,
            train_state=train_state,
        )
        if topo.rank == 0:
            how = "writing in the background" if saver.async_save else "saved"
            print(
                f"checkpoint {path}: {how} (training paused {saver.stats['snapshot_s']:.2f} s to copy "
                f"{saver.stats['bytes'] / 2**20:.1f} MiB per rank)",
                flush=True,
            )
        return True

    def roll_back(reason: str, from_step: int) -> int:
        """Reload the newest intact checkpoint; returns its step. The data loader keeps its place,
        so the batches that led here are skipped, not replayed."""
        trainer.guard.start_rollback(reason)  # raises Diverged when none is left
        if saver is None:
            raise Diverged(f"{reason} at step {from_step}, and no checkpoint.dir to roll back to")
        trainer.progress("rollback")
        saver.wait()  # the save in flight may be the newest good checkpoint
        candidates = checkpoint_candidates(ck.dir, find_resume_checkpoint(ck.dir, "auto"))
        if not candidates:
            raise Diverged(f"{reason} at step {from_step}, before any checkpoint was saved to roll back to")
        path, meta = load_newest_intact(
            candidates, model=chunks, optimizer=trainer.optimizer, config=config, topo=topo, zero=trainer.zero, warn=say
        )
        trainer.load_train_state(meta["train_state"], rollback=True)
        skipped = data.train.consumed_samples - meta["train_state"]["consumed_samples"]
        logger.rewind(meta["step"])
        logger.log(
            {
                "step": meta["step"],
                "rollback": {
                    "from_step": from_step,
                    "reason": reason,
                    "checkpoint": str(path),
                    "skipped_samples": skipped,
                    "rollbacks": trainer.guard.rollbacks,
                },
            },
            console=(
                f"rollback {trainer.guard.rollbacks} of at most {config.faults.max_rollbacks}: {reason} at step "
                f"{from_step}; reloaded {path}, skipping the {skipped} samples read since it"
            ),
        )
        return meta["step"]

    def run_eval(step_now: int) -> dict:
        val = trainer.evaluate()
        record = {"step": step_now, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        logger.log(
            record, console=f"step {step_now:>6} | validation loss {val:.4f} | perplexity {record['val_ppl']:.2f}"
        )
        return record

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Throughput counts step time only: evaluation and checkpoint time are not training speed.
    interval_time, interval_steps, last = 0.0, 0, {}
    saved_at = evaluated_at = step
    stopped = None
    if data.valid is not None and t.eval_interval and step == 0:
        run_eval(0)  # the baseline the validation curve starts from
    meter = StragglerMeter(factor=config.faults.straggler_factor, world_size=topo.world_size, device=device)
    with StopRequests(minutes=t.exit_after_minutes, world_size=topo.world_size, device=device) as stop:
        while step < t.steps:
            step += 1
            watchdog.beat("step start", step=step)
            meter.start()
            step_start = time.perf_counter()
            record = trainer.step(step)
            sync()
            meter.stop()
            interval_time += time.perf_counter() - step_start
            interval_steps += 1
            bad = record["bad_step"]
            # A bad step is always logged (the same decision on every rank: the meter's report is
            # a collective).
            if step % t.log_interval == 0 or step == t.steps or bad:
                last = log_step(
                    logger,
                    step,
                    record,
                    config=config,
                    speed=speed.of(interval_time / interval_steps),
                    consumed=data.train.consumed_samples,
                    device=device,
                    stragglers=meter.report(),
                    bad_in_a_row=trainer.guard.consecutive_bad,
                )
                interval_time, interval_steps = 0.0, 0
            if trainer.guard.must_roll_back():
                step = saved_at = evaluated_at = roll_back(bad, step)
                continue
            watchdog.beat("stop check (all-reduce)")
            stopped = stop.check()
            if stopped:
                if logging_rank:
                    print(f"stopping after step {step} of {t.steps}: {stopped}", flush=True)
                break
            if data.valid is not None and t.eval_interval and step % t.eval_interval == 0:
                last = {**last, **run_eval(step)}
                evaluated_at = step
            if ck.interval and step % ck.interval == 0:
                if not save(step):
                    step = saved_at = evaluated_at = roll_back("the weights are not finite", step)
                    continue
                saved_at = step

        # A stopped run saves at once and skips the final evaluation: the time left before the
        # scheduler's kill is for the checkpoint.
        if data.valid is not None and evaluated_at != step and not stopped:
            last = {**last, **run_eval(step)}
        if saved_at != step and not save(step):
            raise Diverged(f"the weights are not finite after step {step}: not saved")
        if saver is not None:
            watchdog.beat("waiting for the last checkpoint write")
            saver.finish()  # the last checkpoint is published before the run reports success
    logger.close()
    if stopped:
        last = {**last, "stopped": stopped}
    return last


@dataclass
class Throughput:
    """Speed figures of a step time: tokens/s, TFLOP/s per rank and MFU against `peak_tflops`."""

    tokens_per_step: int
    flops_per_step: float
    peak_tflops: float
    world_size: int

    def of(self, seconds: float) -> dict:
        tflops = self.flops_per_step / seconds / 1e12 / self.world_size
        return {
            "tokens_per_s": self.tokens_per_step / seconds,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops,
            "step_time_s": seconds,
        }


def log_step(
    logger: MetricsLogger,
    step: int,
    record: dict,
    *,
    config: RunConfig,
    speed: dict,
    consumed: int,
    device: torch.device,
    stragglers: list[dict],
    bad_in_a_row: int,
) -> dict:
    """One metrics record and console line for `step`; `speed`: Throughput.of the mean step time."""
    last = {
        "step": step,
        **record,
        **speed,
        "consumed_samples": consumed,
        "peak_mem_bytes": peak_memory_bytes(device),
        "stragglers": stragglers,
    }
    if record["bad_step"] is None:
        del last["bad_step"]
    console = (
        f"step {step:>6}/{config.train.steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad {record['grad_norm']:.3f} | {speed['tokens_per_s']:,.0f} tok/s | {speed['tflops']:.3f} "
        f"TFLOP/s | MFU {100 * speed['mfu']:.1f}% | mem {last['peak_mem_bytes'] / 2**30:.2f} GiB"
    )
    if record["bad_step"] is not None:
        console += (
            f"\nstep {step} skipped on every rank: {record['bad_step']} ({bad_in_a_row} in a row; "
            f"{config.faults.max_bad_steps} in a row roll back to the last checkpoint)"
        )
    for slow in stragglers:
        console += (
            f"\nstraggler: rank {slow['rank']} on {slow['host']} worked {slow['own_work_s']:.3f} s, "
            f"{slow['ratio']:.1f}x the median rank's {slow['median_s']:.3f} s since the last report"
        )
    logger.log(last, console=console)
    return last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    code, together = 0, False  # together: every rank ends here at the same point
    try:
        config = load_config(argv[0], argv[1:])
        launch = discover()
        with run_lock(config.checkpoint.dir, rank=launch.rank):  # one run per checkpoint.dir
            last = run(config, launch=launch)
        if last.get("stopped"):
            code = EXIT_RESUMABLE
            where = f"; resume from {config.checkpoint.dir}" if config.checkpoint.dir else " (no checkpoint.dir)"
            print(f"stopped early ({last['stopped']}) with exit code {EXIT_RESUMABLE}{where}", flush=True)
        together = True
    except ValueError as e:  # ConfigError, CheckpointError, LaunchError, dataset errors: user mistakes
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Diverged, CheckpointSaveError) as e:  # decided by all ranks together
        code, together = EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_CHECKPOINT_FAILED, True
        print(f"error: {e} (exit code {code})", file=sys.stderr, flush=True)
    finally:
        if dist.is_initialized():
            if together:
                # Every rank must be past its last collective before any tears its group down;
                # otherwise a peer's gloo thread can find its connection gone and abort the process.
                dist.barrier()
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
