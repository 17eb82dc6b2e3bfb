"""The `checkpoint:` and `logging:` sections: what a run writes, and where."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.errors import _need


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Directory holding step_N/ checkpoints and the `latest` pointer (empty: no checkpoints)."""
    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    resume: str = "auto"
    """`auto` resumes from `latest` when there is one, `none` never, or a step_N directory path."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0 keeps all); older ones go once a newer is complete."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only while the tensors are copied to
    host memory (and, at the next save, for the previous write to finish)."""

    def validate(self) -> None:
        _need(self.interval >= 0, "checkpoint.interval", f"must be >= 0, got {self.interval}")
        _need(self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    dir: str = ""
    """Directory for metrics.jsonl and TensorBoard events (empty: console only)."""
    tensorboard: bool = True
    """Write TensorBoard event files under logging.dir."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU. Default: the detected GPU's datasheet dense peak
    (pretrain/hardware.py), else this CPU's matmul rate measured once and cached; a step that
    achieves more raises the peak to its rate, so MFU never exceeds 1."""

    def validate(self) -> None:
        _need(
            self.peak_tflops is None or self.peak_tflops > 0,
            "logging.peak_tflops",
            f"must be positive, got {self.peak_tflops}",
        )
