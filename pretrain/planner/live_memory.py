"""Live memory of one rank, counted by storage and split by what holds it: for the dry run on
fake tensors (dry_run.py) and for measuring real runs on CPU tensors (tests, bench/).

`LiveMemory` is a TorchDispatchMode: every tensor an operator returns has its storage recorded
once (views share a storage, so a tensor and its views count once), with a weak reference whose
callback takes the bytes off when the storage dies. Nothing polls the allocator, so the same
figure comes out for fake tensors (which have none) and for real ones.

At the peak, the live storages are split into categories by identity with what the training
strategy holds at that moment (its `held_tensors()`: weights, gradients, optimizer state);
every other live storage (saved activations, logits and loss buffers, communication buffers,
temporaries) is "activations". Identity is asked lazily: a peak is split at the next operator
or the next free, when memory is still exactly the peak's, so the strategy's state is read once
per peak-raising operator instead of once per allocation.

torch's own MemTracker refuses modules that run several times per step (pipeline chunks run
once per micro-batch), so this counts storages and knows nothing of modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "gradients", "optimizer", "activations")
GiB = 2**30

# storage key -> category; storages it does not name are activations
Categorize = Callable[[], dict[int, str]]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of live device memory by what holds it (storages counted once)."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0  # every other live tensor: saved activations, logits, buffers, temporaries

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        return {name: getattr(self, name) / GiB for name in (*CATEGORIES, "total")}


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage, shared by all its views; the address of the C++ StorageImpl
    (valid for fake tensors too, whose data pointers are all 0)."""
    return t.untyped_storage()._cdata


def categories_of(held: dict[str, list[torch.Tensor]]) -> dict[int, str]:
    """storage key -> category for the tensors a strategy holds, by category name. A storage
    named twice keeps the first category in CATEGORIES order (a gradient buffer that is also a
    parameter's .grad is one gradient)."""
    keys: dict[int, str] = {}
    for name in CATEGORIES:
        for t in held.get(name, ()):
            if t is not None:
                keys.setdefault(storage_key(t), name)
    return keys


class LiveMemory(TorchDispatchMode):
    """Counts live storages on `device_type` while active; `peak` and `now()` split them by
    `categorize` (set it once what holds the state exists; until then all is activations)."""

    def __init__(self, *, device_type: str = "cpu", categorize: Categorize | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.categorize: Categorize = categorize or dict
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # storage key -> (weak ref, bytes)
        self._total = 0
        self._peak_total = 0
        self.peak = MemoryBreakdown()
        self._pending = False  # the peak grew and is not split yet
        self._known: dict[int, str] = {}  # categories at the last split (for storages freed since)

    @property
    def total(self) -> int:
        return self._total

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self._peak_total, self._pending = self._total, False
        self.peak = self.now()

    def now(self) -> MemoryBreakdown:
        """What is live now, split by category."""
        return self._split(self.categorize())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._pending:
            self._settle_peak()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._record(t)
        if self._total > self._peak_total:
            self._peak_total, self._pending = self._total, True
        return out

    def _record(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
            self._total += size
        elif entry[1] != size:  # resized in place
            self._live[key] = (entry[0], size)
            self._total += size - entry[1]

    def _free(self, key: int) -> None:
        if self._pending:
            self._settle_peak(freed=key)
        entry = self._live.pop(key, None)
        if entry is not None:
            self._total -= entry[1]
        self._known.pop(key, None)

    def _settle_peak(self, freed: int | None = None) -> None:
        """Split the peak while memory is still the peak's. A storage being freed right now is
        no longer reachable from the strategy: it keeps the category it had at the last split."""
        self._pending = False
        categories = self.categorize()
        if freed is not None and freed in self._known:
            categories.setdefault(freed, self._known[freed])
        self.peak = self._split(categories)
        self._known = categories

    def _split(self, categories: dict[int, str]) -> MemoryBreakdown:
        sizes = dict.fromkeys(CATEGORIES, 0)
        for key, (_, size) in list(self._live.items()):
            sizes[categories.get(key, "activations")] += size
        return MemoryBreakdown(**sizes)
