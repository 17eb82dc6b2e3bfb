"""The `data:` section: which token files to train on, how they split, and the objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.config.errors import ConfigError, _need


def _check_blend(text: str, key: str) -> None:
    from pretrain.data.blend import parse_data_path  # numpy only; nothing of torch

    try:
        parse_data_path(text, "the blend")
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


@dataclass
class DataStage:
    """One entry of data.stages: from its start on, training reads this blend."""

    path: str = ""
    """This stage's data, written as data.path: a prefix, or `w1 p1 w2 p2 ...` to blend."""
    start_step: int | None = None
    """The stage begins after this many optimizer steps (0 for the first stage)."""
    start_fraction: float | None = None
    """Or: after this fraction of train.steps, rounded to the nearest step (0.9: the last 10%)."""

    def validate(self, key: str) -> None:
        _need(bool(self.path.strip()), f"{key}.path", "is empty: give the stage's prefix or 'w1 p1 w2 p2 ...'")
        _check_blend(self.path, f"{key}.path")
        _need(
            (self.start_step is None) != (self.start_fraction is None),
            key,
            "give exactly one of start_step (a step count) or start_fraction (a share of train.steps), "
            f"got start_step={self.start_step}, start_fraction={self.start_fraction}",
        )
        _need(
            self.start_step is None or self.start_step >= 0,
            f"{key}.start_step",
            f"must be >= 0, got {self.start_step}",
        )
        _need(
            self.start_fraction is None or 0 <= self.start_fraction < 1,
            f"{key}.start_fraction",
            f"must be in [0, 1), got {self.start_fraction}",
        )

    def start(self, total_steps: int) -> int:
        """The number of steps trained before this stage begins."""
        if self.start_step is not None:
            return self.start_step
        return round(self.start_fraction * total_steps)


@dataclass
class DataConfig:
    path: str = ""
    """A dataset prefix (PREFIX for PREFIX.bin/.idx), or `w1 p1 w2 p2 ...` to blend."""
    stages: list[DataStage] = field(default_factory=list)
    """Data stages instead of data.path: each stage's blend trains from its start to the next
    stage's (e.g. a final annealing phase on a higher-quality mix). YAML list of {path,
    start_step or start_fraction}; the first starts at 0. On the command line:
    `data.stages='[{path: A, start_step: 0}, {path: "0.5 A 0.5 B", start_fraction: 0.9}]'` or
    `data.stages.1.start_step=900`. Validation reads the first stage's data."""
    tokenizer: str = ""
    """Tokenizer model file (sentencepiece .model); used to check the vocabulary and to sample."""
    split: str = "98,2,0"
    """Train/valid/test shares of the documents, comma separated."""
    objective: Literal["causal", "masked"] = "causal"
    """`causal`: next-token prediction. `masked`: BERT-style 80/10/10 masked-LM on the same files
    (needs model.bidirectional=true and a tokenizer with a mask token)."""
    mask_prob: float = 0.15
    """masked objective: share of tokens chosen for prediction."""
    mean_span: float | None = None
    """masked objective: mask whole spans of geometric length with this mean (SpanBERT)."""
    cache_dir: str = ""
    """Where sample indices are cached (default: index-cache/ beside the data)."""
    document_attention_mask: bool = False
    """Tokens attend only within their own document of a packed sequence (documents end at the
    tokenizer's end-of-document token), like Megatron's --reset-attention-mask."""

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        parts = [float(x) for x in self.split.split(",")]
        return (parts + [0.0, 0.0, 0.0])[:3]  # type: ignore[return-value]

    def validate(self) -> None:
        """The keys' form only: whether the files exist is checked when a run starts
        (pretrain.data.setup.check_data), since converting a checkpoint needs no data."""
        try:
            ratios = self.split_ratios
        except ValueError:
            raise ConfigError(f"data.split: expected three comma-separated numbers, got {self.split!r}") from None
        _need(
            all(r >= 0 for r in ratios) and ratios[0] > 0,
            "data.split",
            f"needs a positive train share and no negative shares, got {self.split!r}",
        )
        if self.path:
            _check_blend(self.path, "data.path")
        _need(
            not (self.path and self.stages),
            "data.stages",
            "data.path and data.stages are both set: with stages, each stage's path is its data; "
            "leave data.path empty (`data.path=` on the command line, over a config file's path), "
            "or drop data.stages to train on data.path throughout",
        )
        for i, stage in enumerate(self.stages):
            stage.validate(f"data.stages.{i}")
        _need(
            not (self.document_attention_mask and not self.tokenizer),
            "data.document_attention_mask",
            "needs data.tokenizer (its end-of-document token separates the documents)",
        )
        _need(0 < self.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")

    def stage_plan(self, total_steps: int) -> list[tuple[int, str]]:
        """(start step, blend) of each stage in order: data.path alone is one stage from 0.
        Whether the starts fit train.steps is checked once (config.checks._check_data_stages)."""
        if not self.stages:
            return [(0, self.path)]
        return [(stage.start(total_steps), stage.path) for stage in self.stages]
