"""The `faults:` section: the thresholds of pretrain/faults/ (bad steps, rollbacks, stragglers)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.errors import ConfigError


@dataclass
class FaultsConfig:
    """What the run does about bad steps and slow ranks (pretrain/faults/). A bad step (loss or
    gradient norm not finite, or a loss spike) is skipped on every rank; max_bad_steps of them in
    a row roll the run back to its last checkpoint, past the data that led there."""

    spike_sigmas: float = 6.0
    """A loss above mean + spike_sigmas x std of the last spike_window good steps is a spike;
    0 turns spike detection off (non-finite values are always caught)."""
    spike_window: int = 100
    """Good steps the spike rule looks back on; it starts judging once the window is full."""
    spike_min_increase: float = 0.1
    """A spike must also exceed the window's mean loss by this fraction of it: late in training
    the loss barely moves, and a tiny std would otherwise flag ordinary noise."""
    max_bad_steps: int = 5
    """Consecutive skipped steps after which the run rolls back to its last checkpoint."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run (counted across restarts); one more stops it with exit 77."""
    straggler_factor: float = 1.5
    """Every log interval, a rank whose own work (step time minus time blocked waiting for its
    peers) exceeds the median's by this factor is reported; 0 turns the check off."""

    def validate(self) -> None:
        for key in ("spike_sigmas", "spike_min_increase", "straggler_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"faults.{key}: must be >= 0 (0 turns it off), got {getattr(self, key)}")
        for key in ("spike_window", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"faults.{key}: must be at least 1, got {getattr(self, key)}")
        if self.max_rollbacks < 0:
            raise ConfigError(f"faults.max_rollbacks: must be >= 0, got {self.max_rollbacks}")
        if 0 < self.straggler_factor <= 1:
            raise ConfigError(
                f"faults.straggler_factor: must be above 1 (a factor over the median) or 0 "
                f"(off), got {self.straggler_factor}"
            )
