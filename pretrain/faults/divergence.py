"""Bad steps and rollbacks: what keeps a NaN or a loss spike from ruining a run.

Every rank judges each step from the same two numbers, the loss (the data-parallel mean, shared
by every pipeline stage) and the global gradient norm, so all ranks reach the same verdict
without talking. A bad step is skipped (no optimizer update) and counted. Skipping handles a
rare bad batch; a run that keeps producing bad steps has diverged, and `DivergenceGuard` tells
the loop to roll back to its last checkpoint (the loop then skips the data that led there, so
the same batches are not replayed). When the rollbacks allowed are used up the run stops with
`Diverged` (exit code 77, pretrain/stopping.py): a person must look at it.

Megatron re-runs a suspicious step to tell a hardware fault from the data; OLMo-core only
reports spikes; torchtitan stops on non-finite values. Skipping then rolling back recovers
without a person in the common cases (one bad batch, an unlucky stretch of data).
"""

from __future__ import annotations

import math
from collections import deque

from pretrain.config import FaultsConfig


class Diverged(RuntimeError):
    """The run cannot repair itself: rollbacks used up, or fp16 overflowing at its minimum scale."""


def spike_threshold(history: list[float], *, sigmas: float, min_increase: float) -> float:
    """The loss above which a step is a spike, given the recent good losses."""
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    return mean + max(sigmas * std, min_increase * abs(mean))


class DivergenceGuard:
    """Judges steps, counts skips and rollbacks. Its state goes into checkpoints, so a resumed
    or restarted run keeps its loss history and the rollbacks it has used."""

    def __init__(self, config: FaultsConfig) -> None:
        self.config = config
        self.history: deque[float] = deque(maxlen=config.spike_window)
        self.consecutive_bad = 0
        self.skipped_total = 0
        self.rollbacks = 0

    def loss_problem(self, loss: float) -> str | None:
        """Why the step with this loss must be skipped, or None: a NaN or infinite loss always;
        a spike once the spike window is full."""
        c = self.config
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if c.spike_sigmas > 0 and len(self.history) == c.spike_window:
            limit = spike_threshold(list(self.history), sigmas=c.spike_sigmas, min_increase=c.spike_min_increase)
            if loss > limit:
                return (
                    f"loss spike: {loss:.4f} above {limit:.4f} (mean + {c.spike_sigmas:g} std of the last "
                    f"{c.spike_window} steps)"
                )
        return None

    @staticmethod
    def norm_problem(grad_norm: float) -> str | None:
        return None if math.isfinite(grad_norm) else f"gradient norm is {grad_norm}"

    def record(self, loss: float, problem: str | None) -> None:
        """The step's outcome: a good loss joins the history; a bad step counts."""
        if problem is None:
            self.history.append(loss)
            self.consecutive_bad = 0
        else:
            self.consecutive_bad += 1
            self.skipped_total += 1

    def must_roll_back(self) -> bool:
        return self.consecutive_bad >= self.config.max_bad_steps

    def start_rollback(self, reason: str) -> None:
        """Count a rollback; raise Diverged when none is left."""
        if self.rollbacks >= self.config.max_rollbacks:
            raise Diverged(
                f"{self.consecutive_bad} bad steps in a row ({reason}) after {self.rollbacks} "
                f"rollback(s), the most faults.max_rollbacks={self.config.max_rollbacks} allows: the "
                "run keeps diverging; lower optimizer.lr, check the data near this point, or resume "
                "from an earlier checkpoint (checkpoint.resume=PATH)"
            )
        self.rollbacks += 1
        self.consecutive_bad = 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "skipped_total": self.skipped_total, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict, *, keep_rollbacks: bool = False) -> None:
        """`keep_rollbacks`: a rollback reloads an older state but must not give back the
        rollbacks it has used."""
        self.history = deque(state.get("history", []), maxlen=self.config.spike_window)
        self.consecutive_bad = 0
        if not keep_rollbacks:
            self.skipped_total = int(state.get("skipped_total", 0))
            self.rollbacks = int(state.get("rollbacks", 0))
