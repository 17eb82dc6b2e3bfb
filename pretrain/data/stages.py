"""Data stages: the training stream switches blends at given steps (`data.stages`).

A stage that starts at step s trains steps s+1 up to the next stage's start (or train.steps).
Each stage is its own dataset, built by the same rules as a run with one blend
(pretrain.data.builder: megatron-core's GPTDataset samples, blended), sized for the stage's
steps x the global batch, and read by its own SampleLoader. Stage k's datasets use seed
train.seed + k: with one seed, a prefix two stages share would start in the second stage at
the very samples the first stage read first (the same shuffle of the same documents), so an
annealing stage would replay the start of the run instead of drawing afresh. Stage 0 keeps
train.seed, so data.path alone (one stage) gives the samples it always gave.

The loop tells the loader each step before it runs (`begin_step`), so every data-parallel rank
switches at the same step. The position saved in a checkpoint is each stage's own count of
samples read, keyed by the stage's start and blend; `consumed_samples` is their sum (the run's
total, as before). Resuming restores every stage's count, so a run stopped on either side of a
boundary continues exactly; a stage whose start or blend changed since the checkpoint starts
from its first sample (said once on rank 0). A checkpoint from before stages existed holds
only `consumed_samples`: it is the first stage's count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.data.loader import SampleLoader


@dataclass(frozen=True)
class Stage:
    """Steps start+1 .. end read `path` (a prefix or blend) with seed offset `index`."""

    index: int
    start: int
    end: int
    path: str

    @property
    def steps(self) -> int:
        return self.end - self.start

    def describe(self, count: int) -> str:
        return f"data stage {self.index + 1} of {count} (steps {self.start + 1}-{self.end}): {self.path}"


def plan_stages(plan: list[tuple[int, str]], total_steps: int) -> list[Stage]:
    """Stages from DataConfig.stage_plan's (start, path) list (validated by the config)."""
    ends = [start for start, _ in plan[1:]] + [total_steps]
    return [Stage(i, start, end, path) for i, ((start, path), end) in enumerate(zip(plan, ends))]


class StagedLoader:
    """This DP rank's training micro-batches over the run's stages (one stage: one loader).

    `begin_step(step)` before each step's micro-batches selects the stage that step belongs to;
    `announce(line)` (rank 0's print, or None) is told when the stage changes."""

    def __init__(
        self, stages: list[Stage], loaders: list[SampleLoader], *, announce: Callable[[str], None] | None = None
    ) -> None:
        assert stages and len(stages) == len(loaders), (len(stages), len(loaders))
        self.stages, self.loaders, self.announce = stages, loaders, announce
        self.active = 0
        self._announced: int | None = None

    @property
    def consumed_samples(self) -> int:
        """Samples read so far in all stages together (the run's data position, for logs)."""
        return sum(loader.consumed_samples for loader in self.loaders)

    def stage_of(self, step: int) -> int:
        """Index of the stage that trains `step` (1-based, as the loop counts)."""
        return max(i for i, stage in enumerate(self.stages) if stage.start < step or i == 0)

    def begin_step(self, step: int) -> None:
        self.active = self.stage_of(step)
        if self.active != self._announced and len(self.stages) > 1 and self.announce is not None:
            self.announce(f"step {step}: {self.stages[self.active].describe(len(self.stages))}")
        self._announced = self.active

    def __iter__(self) -> StagedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self.loaders[self.active])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's train_state holds of the data position."""
        state: dict[str, Any] = {"consumed_samples": self.consumed_samples}
        if len(self.stages) > 1:
            state["data_stages"] = [
                {"start": stage.start, "path": stage.path, "consumed_samples": loader.consumed_samples}
                for stage, loader in zip(self.stages, self.loaders)
            ]
        return state

    def load_state_dict(self, state: dict[str, Any], *, warn: Callable[[str], None] | None = None) -> None:
        """Continue from a checkpoint's train_state (see the module doc for what is matched)."""
        if "consumed_samples" not in state:
            raise ValueError(
                "the checkpoint's train_state has no consumed_samples: it does not say where in the data to "
                "continue; resume from a checkpoint a training run saved"
            )
        saved = state.get("data_stages")
        if saved is None:  # one stage, or a checkpoint from before stages
            counts = [int(state["consumed_samples"])] + [0] * (len(self.stages) - 1)
        else:
            by_key = {(entry["start"], entry["path"]): int(entry["consumed_samples"]) for entry in saved}
            counts = [by_key.pop((stage.start, stage.path), 0) for stage in self.stages]
            lost = {key: n for key, n in by_key.items() if n > 0}  # read from, but no longer configured
            if warn is not None and lost:
                warn(_changed_stages_warning(self.stages, saved, lost))
        for loader, count in zip(self.loaders, counts):
            if count < 0:
                raise ValueError(f"a stage's consumed_samples in the checkpoint must be non-negative, got {count}")
            loader.consumed_samples = count


def _changed_stages_warning(stages: list[Stage], saved: list[dict], lost: dict[tuple[int, str], int]) -> str:
    known = {(entry["start"], entry["path"]) for entry in saved}
    new = "; ".join(stage.describe(len(stages)) for stage in stages if (stage.start, stage.path) not in known)
    old = "; ".join(f"the stage from step {start} on {path} ({n} samples read)" for (start, path), n in lost.items())
    return f"warning: data.stages changed since the checkpoint: {old} is no longer configured" + (
        f"; starting from their first sample: {new}" if new else ""
    )
