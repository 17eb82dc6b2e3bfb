"""The parts of the training loop that decide for themselves when they act.

pretrain/train.py's loop calls each part after every step; the part knows its own interval:

StepLog       times the steps, logs every train.log_interval (and every bad step) with speed,
              memory and stragglers
Evaluator     validation at the start of a fresh run, every train.eval_interval, at the end
Checkpoints   a save every checkpoint.interval and at the end, never of non-finite weights; the
              rollback to the newest intact checkpoint when the run diverges

Anything else a user adds (a profiler, a custom logger) is a callback: `callback(step, record)`
after every step, passed to `pretrain.train.run(config, callbacks=[...])`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pretrain.checkpoint import Checkpointer, checkpoint_candidates, find_resume_checkpoint, load_newest_intact
from pretrain.config import RunConfig
from pretrain.faults.divergence import Diverged
from pretrain.faults.stragglers import StragglerMeter
from pretrain.metrics import MetricsLogger, Peak, peak_memory_bytes
from pretrain.parallel.topology import Topology
from pretrain.trainer import Trainer

Callback = Callable[[int, dict], None]


@dataclass
class Throughput:
    """Speed figures of a step time: tokens/s, TFLOP/s per rank and MFU against `peak`."""

    tokens_per_step: int
    flops_per_step: float
    peak: Peak
    world_size: int

    def of(self, seconds: float) -> dict:
        tflops = self.flops_per_step / seconds / 1e12 / self.world_size
        return {
            "tokens_per_s": self.tokens_per_step / seconds,
            "tflops": tflops,
            "mfu": self.peak.mfu(tflops),
            "step_time_s": seconds,
            **self.peak.record(),
        }


class StepLog:
    """Step time counts the steps only (evaluation and checkpoint time are not training speed),
    averaged over the steps since the last record."""

    def __init__(self, config: RunConfig, topo: Topology, logger: MetricsLogger, speed: Throughput) -> None:
        self.config, self.logger, self.speed, self.device = config, logger, speed, topo.device
        factor = config.faults.straggler_factor
        self.meter = StragglerMeter(factor=factor, world_size=topo.world_size, device=topo.device)
        self.seconds, self.steps = 0.0, 0
        self.sync = torch.cuda.synchronize if topo.device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        self.meter.start()
        start = time.perf_counter()
        yield
        self.sync()
        self.meter.stop()
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def maybe_log(self, step: int, record: dict, *, consumed: int, bad_in_a_row: int) -> dict | None:
        """The record logged for this step, or None. A bad step is always logged (the same
        decision on every rank: the straggler report is a collective)."""
        t = self.config.train
        if not (step % t.log_interval == 0 or step == t.steps or record["bad_step"]):
            return None
        speed = self.speed.of(self.seconds / self.steps)
        self.seconds, self.steps = 0.0, 0
        stragglers = self.meter.report()
        last = {
            "step": step,
            **record,
            **speed,
            "consumed_samples": consumed,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "stragglers": stragglers,
        }
        if record["bad_step"] is None:
            del last["bad_step"]
        self.logger.log(last, console=self._console(step, record, speed, last, stragglers, bad_in_a_row))
        return last

    def _console(self, step, record, speed, last, stragglers, bad_in_a_row) -> str:
        c = self.config
        line = (
            f"step {step:>6}/{c.train.steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad {record['grad_norm']:.3f} | {speed['tokens_per_s']:,.0f} tok/s | {speed['tflops']:.3f} "
            f"TFLOP/s | MFU {100 * speed['mfu']:.1f}% | mem {last['peak_mem_bytes'] / 2**30:.2f} GiB"
        )
        if "moe_imbalance" in record:  # pretrain/moe_training.py
            line += (
                f" | moe aux {record['moe_aux_loss']:.3f} z {record['moe_z_loss']:.3g} "
                f"imbalance {record['moe_imbalance']:.2f}"
            )
            if "moe_dropped_tokens" in record:
                line += f" dropped {record['moe_dropped_tokens']}"
        if record["bad_step"] is not None:
            line += (
                f"\nstep {step} skipped on every rank: {record['bad_step']} ({bad_in_a_row} in a row; "
                f"{c.faults.max_bad_steps} in a row roll back to the last checkpoint)"
            )
        for slow in stragglers:
            line += (
                f"\nstraggler: rank {slow['rank']} on {slow['host']} worked {slow['own_work_s']:.3f} s, "
                f"{slow['ratio']:.1f}x the median rank's {slow['median_s']:.3f} s since the last report"
            )
        return line


class Evaluator:
    def __init__(self, config: RunConfig, trainer: Trainer, logger: MetricsLogger, *, enabled: bool) -> None:
        self.interval = config.train.eval_interval if enabled else 0
        self.trainer, self.logger = trainer, logger
        self.done_at: int | None = None

    def run(self, step: int) -> dict:
        val = self.trainer.evaluate()
        record = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        console = f"step {step:>6} | validation loss {val:.4f} | perplexity {record['val_ppl']:.2f}"
        self.logger.log(record, console=console)
        self.done_at = step
        return record

    def start(self, step: int) -> None:
        if self.interval and step == 0:
            self.run(0)  # the baseline the validation curve starts from

    def maybe_run(self, step: int) -> dict:
        return self.run(step) if self.interval and step % self.interval == 0 else {}

    def finish(self, step: int) -> dict:
        return self.run(step) if self.interval and self.done_at != step else {}


class Checkpoints:
    """`saved_at`: the step of the newest checkpoint this run wrote or resumed from.
    `data_position()`: the loader's state for train_state (consumed_samples, data stages)."""

    def __init__(
        self,
        config: RunConfig,
        topo: Topology,
        trainer: Trainer,
        logger: MetricsLogger,
        *,
        data_position: Callable[[], dict],
        say: Callable[[str], None] | None,
        step: int,
    ) -> None:
        self.config, self.topo, self.trainer, self.logger, self.say = config, topo, trainer, logger, say
        self.position = data_position
        self.saver = Checkpointer(config.checkpoint.dir, config, topo) if config.checkpoint.dir else None
        self.saved_at = step

    def maybe_save(self, step: int) -> int:
        """Save at the interval; returns the step training continues from (an older one when
        the weights turned out not finite and the run rolled back)."""
        interval = self.config.checkpoint.interval
        if not (interval and step % interval == 0):
            return step
        if not self.save(step):
            return self.roll_back("the weights are not finite", step)
        return step

    def save(self, step: int) -> bool:
        """Write step's checkpoint; False, and nothing written, when the weights are not finite
        (a NaN checkpoint must never become `latest`)."""
        if self.saver is None:
            return True
        self.trainer.progress(f"checkpoint save of step {step}")
        if not self.trainer.weights_finite():
            return False
        train_state = {**self.position(), **self.trainer.train_state()}
        path = self.saver.save(step, state=self.trainer.strategy.checkpoint_state(), train_state=train_state)
        self.saved_at = step
        if self.topo.rank == 0:
            how = "writing in the background" if self.saver.async_save else "saved"
            stats = self.saver.stats
            print(
                f"checkpoint {path}: {how} (training paused {stats['snapshot_s']:.2f} s to copy "
                f"{stats['bytes'] / 2**20:.1f} MiB per rank)",
                flush=True,
            )
        return True

    def roll_back(self, reason: str, from_step: int) -> int:
        """Reload the newest intact checkpoint; returns its step. The data loader keeps its place,
        so the batches that led here are skipped, not replayed."""
        guard, ck = self.trainer.guard, self.config.checkpoint
        guard.start_rollback(reason)  # raises Diverged when none is left
        if self.saver is None:
            raise Diverged(f"{reason} at step {from_step}, and no checkpoint.dir to roll back to")
        self.trainer.progress("rollback")
        self.saver.wait()  # the save in flight may be the newest good checkpoint
        candidates = checkpoint_candidates(ck.dir, find_resume_checkpoint(ck.dir, "auto"))
        if not candidates:
            raise Diverged(f"{reason} at step {from_step}, before any checkpoint was saved to roll back to")
        state = self.trainer.strategy.checkpoint_state()
        path, meta = load_newest_intact(candidates, state=state, config=self.config, topo=self.topo, warn=self.say)
        self.trainer.load_train_state(meta["train_state"], rollback=True)
        skipped = self.position()["consumed_samples"] - meta["train_state"]["consumed_samples"]
        self.saved_at = meta["step"]
        self.logger.rewind(meta["step"])
        rollback = {
            "from_step": from_step,
            "reason": reason,
            "checkpoint": str(path),
            "skipped_samples": skipped,
            "rollbacks": guard.rollbacks,
            # Where step meta["step"] + 1 reads from: tools/inspect_data.py --step follows it.
            "data_position": self.position(),
        }
        self.logger.log(
            {"step": meta["step"], "rollback": rollback},
            console=(
                f"rollback {guard.rollbacks} of at most {self.config.faults.max_rollbacks}: {reason} at step "
                f"{from_step}; reloaded {path}, skipping the {skipped} samples read since it"
            ),
        )
        return meta["step"]

    def finish(self, step: int) -> None:
        """The final save (unless this step is saved already), published before the run reports
        success."""
        if self.saved_at != step and not self.save(step):
            raise Diverged(f"the weights are not finite after step {step}: not saved")
        if self.saver is not None:
            self.trainer.progress("waiting for the last checkpoint write")
            self.saver.finish()
