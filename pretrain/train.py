"""The training loop: `python -m pretrain.train CONFIG.yaml [section.key=value ...]`.

The same command trains on one process or, under torchrun/srun/mpirun, on a TP x PP x DP grid.
The loop is thin on purpose: build (topology, data, model, optimizer), resume, then per step
run the schedule, synchronise gradients, clip, step; logging, evaluation and checkpointing
plug in beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    checkpoint_candidates,
    find_resume_checkpoint,
    load_newest_intact,
)
from pretrain.checkpoint.fallback import first_readable, step_of
from pretrain.checkpoint.guard import check_no_overwrite, run_lock
from pretrain.config import RunConfig, load_config
from pretrain.data.setup import Data, build_data, check_data
from pretrain.device import pick_device
from pretrain.faults.divergence import Diverged
from pretrain.faults.watchdog import Watchdog
from pretrain.launch import discover
from pretrain.loop import Callback, Checkpoints, Evaluator, StepLog, Throughput
from pretrain.metrics import MetricsLogger, select_peak, training_flops
from pretrain.models.attention import check_backend
from pretrain.parallel.bootstrap import init_distributed
from pretrain.parallel.model_chunks import build_model_chunks
from pretrain.parallel.topology import Topology
from pretrain.stopping import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_RESUMABLE, StopRequests
from pretrain.strategy import strategy_class, weight_dtype
from pretrain.trainer import Trainer


def run(config: RunConfig, *, launch=None, callbacks: Sequence[Callback] = ()) -> dict:
    """Train as configured; returns the last record logged (on the logging rank), with
    `stopped` set to the reason when a signal or train.exit_after_minutes ended it early.
    `launch`: this process's place in the job (pretrain.launch.discover() when not given).
    `callbacks`: called as callback(step, record) after every step (a profiler, a logger)."""
    t, ck = config.train, config.checkpoint
    # Everything a user can get wrong is checked before any process group starts (the layout by
    # init_distributed, before it starts one).
    launch = launch or discover()
    tokenizer = check_data(config)
    device = pick_device(t.device, local_rank=launch.local_rank, local_world_size=launch.local_world_size)
    check_backend(config.model.attention_backend, device)
    strategy_class(config).check_environment(config)
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
        start = Start(watchdog=watchdog, resume_from=resume_from, tokenizer=tokenizer, say=say)
        return fit(config, topo, start, callbacks=callbacks)


@dataclass
class Start:
    """What run() found before the process groups started, for fit() to build on."""

    watchdog: Watchdog
    resume_from: Path | None  # the checkpoint chosen (an older one is tried when it is damaged)
    tokenizer: object | None
    say: Callable[[str], None] | None  # rank 0's warnings; None elsewhere


def fit(config: RunConfig, topo: Topology, start: Start, *, callbacks: Sequence[Callback] = ()) -> dict:
    """run() once the process groups are up: build, resume, then the loop; each part decides when
    it acts (pretrain/loop.py)."""
    t, watchdog, say = config.train, start.watchdog, start.say
    data, trainer, step = build(config, topo, start)
    # resume_step: steps after it are (re)run here, so their old records in metrics.jsonl go.
    logger = MetricsLogger(
        config.logging.dir, tensorboard=config.logging.tensorboard, enabled=topo.is_logging_rank, resume_step=step
    )
    steps = StepLog(config, topo, logger, throughput(config, topo, trainer))
    evaluator = Evaluator(config, trainer, logger, enabled=data.valid is not None)
    checkpoints = Checkpoints(config, topo, trainer, logger, data_position=data.train.state_dict, say=say, step=step)
    last, stopped = {}, None
    evaluator.start(step)
    with StopRequests(minutes=t.exit_after_minutes, world_size=topo.world_size, device=topo.device) as stop:
        while step < t.steps:
            step += 1
            watchdog.beat("step start", step=step)
            data.train.begin_step(step)  # the data stage this step reads, the same on every rank
            with steps.timed():
                record = trainer.step(step)
            consumed, bad_in_a_row = data.train.consumed_samples, trainer.guard.consecutive_bad
            last = steps.maybe_log(step, record, consumed=consumed, bad_in_a_row=bad_in_a_row) or last
            if trainer.guard.must_roll_back():
                step = checkpoints.roll_back(record["bad_step"], step)
                continue
            watchdog.beat("stop check (all-reduce)")
            stopped = stop.check()
            if stopped:
                if topo.is_logging_rank:
                    print(f"stopping after step {step} of {t.steps}: {stopped}", flush=True)
                break
            last = {**last, **evaluator.maybe_run(step)}
            step = checkpoints.maybe_save(step)
            for callback in callbacks:
                callback(step, record)
        # A stopped run saves at once and skips the final evaluation: the time left before the
        # scheduler's kill is for the checkpoint.
        if not stopped:
            last = {**last, **evaluator.finish(step)}
        checkpoints.finish(step)
    logger.close()
    return {**last, "stopped": stopped} if stopped else last


def build(config: RunConfig, topo: Topology, start: Start) -> tuple[Data, Trainer, int]:
    """Data, model and trainer, resumed from start.resume_from (or the newest intact checkpoint
    before it); returns them and the step training continues after."""
    t, ck, watchdog, resume_from = config.train, config.checkpoint, start.watchdog, start.resume_from
    # Data first: a missing or mismatched dataset should fail before a model is built.
    watchdog.beat("building the datasets")
    announce = (lambda line: print(line, flush=True)) if topo.rank == 0 else None
    data = build_data(config, topo, tokenizer=start.tokenizer, announce=announce)
    watchdog.beat("building the model")
    # Dropout streams: equal across TP and DP ranks, different per pipeline stage.
    torch.manual_seed(t.seed + 100 * topo.pp_rank)
    chunks = build_model_chunks(config.model, topo, init_seed=t.seed, dtype=weight_dtype(config))
    trainer = Trainer(config, topo, chunks, train_batches=iter(data.train), valid=data.valid, collate=data.collate)
    trainer.progress = watchdog.beat
    described = trainer.strategy.describe()
    if described and topo.rank == 0:
        print(described, flush=True)
    step = 0
    if resume_from is not None:  # a damaged checkpoint falls back to the one before it
        watchdog.beat(f"loading {resume_from}")
        candidates = checkpoint_candidates(ck.dir, resume_from)
        state = trainer.strategy.checkpoint_state()
        resumed, meta = load_newest_intact(candidates, state=state, config=config, topo=topo, warn=start.say)
        step = meta["step"]
        trainer.load_train_state(meta["train_state"])
        data.train.load_state_dict(meta["train_state"], warn=start.say)  # the data position of the one loaded
        if topo.rank == 0:
            print(f"resumed from {resumed} at step {step}", flush=True)
    return data, trainer, step


def throughput(config: RunConfig, topo: Topology, trainer: Trainer) -> Throughput:
    """What a step's time is turned into (and the run's one-line summary, on the logging rank)."""
    say = (lambda line: print(line, flush=True)) if topo.is_logging_rank else None
    precision = config.train.precision
    peak = select_peak(configured=config.logging.peak_tflops, device=topo.device, precision=precision, say=say)
    global_batch, seq = config.global_batch(topo.dp), config.model.seq_length
    if say:
        m = config.model
        say(
            f"model: {m.flavour}, {m.num_layers} layers, hidden {m.hidden_size}, {trainer.num_params / 1e6:.2f}M "
            f"parameters on this rank; {topo.describe()}; global batch {global_batch} x {seq} tokens "
            f"({trainer.accum} micro-batches per rank); {topo.device.type}, {precision}"
        )
        say(f"MFU against peak {peak.tflops:.4g} TFLOP/s {precision} per rank: {peak.source}")
    return Throughput(
        tokens_per_step=global_batch * seq,
        peak=peak,
        world_size=topo.world_size,
        flops_per_step=training_flops(config.model, batch=global_batch, seq=seq),
    )


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
