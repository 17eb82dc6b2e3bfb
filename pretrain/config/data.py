"""The `data:` section: which token files to train on, how they split, and the objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import ConfigError, _need


@dataclass
class DataConfig:
    path: str = ""
    """A dataset prefix (PREFIX for PREFIX.bin/.idx), or `w1 p1 w2 p2 ...` to blend."""
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
            from pretrain.data.blend import parse_data_path  # numpy only; nothing of torch

            try:
                parse_data_path(self.path)
            except ValueError as e:
                raise ConfigError(f"data.path: {e}") from None
        _need(
            not (self.document_attention_mask and not self.tokenizer),
            "data.document_attention_mask",
            "needs data.tokenizer (its end-of-document token separates the documents)",
        )
        _need(0 < self.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
