"""The conversion's one error type and its warnings (shared by the mapping modules)."""

from __future__ import annotations

import sys


class HFConversionError(ValueError):
    """A model, directory or setting the conversion cannot handle; the message says which."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
