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
from collections.abc import Callable
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
from pretrain.config import RunConfig, load_config
from pretrain.data.setup import build_data, check_data
from pretrain.device import pick_device
from pretrain.faults.divergence import Diverged
from pretrain.faults.stragglers import StragglerMeter
from pretrain.faults.watchdog import Watchdog
from pretrain.launch import discover
from pretrain.metrics import MetricsLogger, measure_peak_tflops, peak_memory_bytes, training_flops
from pretrain.models.attention import check_backend
from pretrain.models.build import weight_dtype
from pretrain.parallel.pipeline import build_model_chunks
from pretrain.parallel.topology import Topology, init_distributed, validate_layout
from pretrain.parallel.zero import require_deepspeed
from pretrain.stopping import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_RESUMABLE, StopRequests
from pretrain.trainer import Trainer


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
