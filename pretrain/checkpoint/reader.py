"""Reading a saved checkpoint: any tensor whole, or sliced for another layout.

`SavedCheckpoint` indexes the tensor files of one step directory (headers only; data is read
lazily through safetensors' memory map) and answers "the full tensor named X" or "the shard of
X that TP rank r of t holds", for weights and optimizer state alike. Loading into a live model
(pretrain/checkpoint/reshard.py), the offline resharder, load_model and the Hugging Face
exporter all read through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from pretrain.checkpoint.files import (CheckpointError, model_file, optimizer_file, read_config, read_meta,
                                       resolve_checkpoint)
from pretrain.config import ModelConfig, RunConfig
from pretrain.models.layers import ShardSpec, shard_tensor, unshard_tensors

# Parameters whose rows are the (padded) vocabulary: the padding grows with the TP size, and
# padding rows take no part in the loss, so they are cut or zero-filled to fit another layout.
VOCAB_PARAMS = ("embed.weight", "head.weight")

# Model fields that decide parameter shapes; a checkpoint loads only into an equal model.
SHAPE_FIELDS = ("flavour", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size", "vocab_size", "tied")


def check_same_model(saved: ModelConfig, here: ModelConfig, where: Path) -> None:
    fields = SHAPE_FIELDS + (("positions",) if here.flavour == "gpt2" else ())  # learned positions
    differ = [f"model.{f}: checkpoint {getattr(saved, f)}, this run {getattr(here, f)}"
              for f in fields if getattr(saved, f) != getattr(here, f)]
    if differ:
        raise CheckpointError(f"{where} holds a different model shape ({'; '.join(differ)}); use the "
                              "checkpoint's model settings (its config.yaml) or start without it")


def fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary tensor cut or zero-padded to `rows` rows (only padding rows change)."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] > rows:
        return full[:rows]
    out = full.new_zeros((rows, *full.shape[1:]))
    out[: full.shape[0]] = full
    return out


class SavedCheckpoint:
    """One step directory, indexed. `names` are the model's parameter names; `has_optimizer`
    says whether optimizer state was saved (imported checkpoints hold weights only)."""

    def __init__(self, path: str | Path) -> None:
        self.dir = resolve_checkpoint(path)
        self.meta = read_meta(self.dir)
        self.config: RunConfig = read_config(self.dir)
        layout = self.meta["layout"]
        self.tp, self.pp, self.parts = layout["tensor"], layout["pipeline"], self.meta["parts"]
        self.has_optimizer = bool(self.meta.get("has_optimizer", True))
        self._open: dict[Path, object] = {}
        self._whole: dict[Path, dict[str, torch.Tensor]] = {}  # files read at once (read_whole_files)
        self.read_whole_files = False
        self.specs: dict[str, Optional[ShardSpec]] = {}
        self.shapes: dict[str, list[int]] = {}
        # name -> tp rank -> pipeline rank -> the file holding that shard (a tied embedding is on
        # two pipeline ranks)
        self._model: dict[str, dict[int, dict[int, Path]]] = {}
        self._optim: dict[str, dict[int, dict[int, Path]]] = {}  # "name/key" -> the same
        for tp in range(self.tp):
            for pp in range(self.pp):
                for part in range(self.parts):
                    self._index_model(self.dir / model_file(tp, pp, part), tp, pp)
                    if self.has_optimizer:
                        self._index(self.dir / optimizer_file(tp, pp, part), tp, pp, self._optim)
        self.names = sorted(self._model)
        incomplete = [n for n, ranks in self._model.items() if len(ranks) != self.tp]
        if incomplete:
            raise CheckpointError(f"{self.dir}: tensors missing from some tensor-parallel ranks' files "
                                  f"(e.g. {incomplete[0]}): the checkpoint is incomplete")

    # -- the index ------------------------------------------------------------------------------

    def _handle(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (saved at layout "
                                      f"{self.meta['layout']})")
            try:
                self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # truncated or foreign file
                raise CheckpointError(f"{path} is not a readable tensor file: {e}") from None
        return self._open[path]

    def _index(self, path: Path, tp: int, pp: int, into: dict) -> object:
        handle = self._handle(path)
        for key in handle.keys():
            into.setdefault(key, {}).setdefault(tp, {})[pp] = path
        return handle

    def _index_model(self, path: Path, tp: int, pp: int) -> None:
        handle = self._index(path, tp, pp, self._model)
        meta = handle.metadata() or {}
        try:
            for name, spec in json.loads(meta["specs"]).items():
                self.specs[name] = ShardSpec(*spec) if spec else None
            self.shapes.update(json.loads(meta["shapes"]))
        except (KeyError, ValueError, TypeError):
            raise CheckpointError(f"{path} has no pretrain shard metadata: not a pretrain checkpoint file") from None

    # -- tensors ----------------------------------------------------------------------------------

    def optimizer_keys(self, name: str) -> list[str]:
        prefix = f"{name}/"
        return sorted(k[len(prefix):] for k in self._optim if k.startswith(prefix))

    def _stored(self, key: str, tp: int, optimizer: bool, pp: Optional[int] = None) -> torch.Tensor:
        """The saved shard `key` of TP rank tp, from pipeline rank pp's file when it has one."""
        index = self._optim if optimizer else self._model
        if key not in index:
            kind = "optimizer state" if optimizer else "weight"
            raise CheckpointError(f"{self.dir} has no {kind} '{key}' (a different model shape?)")
        files = index[key][tp]
        path = files.get(pp, next(iter(files.values())))
        if self.read_whole_files:
            if path not in self._whole:
                self._whole[path] = read_whole(path)
            return self._whole[path][key]
        return self._handle(path).get_tensor(key)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The unsharded weight `name`, or its optimizer state `key` (exp_avg, step, ...)."""
        stored = name if key is None else f"{name}/{key}"
        spec = self.specs.get(name)
        first = self._stored(stored, 0, key is not None)
        if spec is None or self.tp == 1 or first.dim() == 0:  # replicated, or a scalar such as step
            return first
        return unshard_tensors([first] + [self._stored(stored, t, key is not None) for t in range(1, self.tp)], spec)

    def shard(self, name: str, key: Optional[str] = None, *, tp_rank: int, tp_size: int,
              rows: Optional[int] = None, pp_rank: Optional[int] = None) -> torch.Tensor:
        """What TP rank tp_rank of tp_size holds of `name` (or of its state `key`); `rows`: the
        vocabulary rows (padded) the target layout has, for the vocabulary tensors; `pp_rank`:
        read from that pipeline rank's files where they hold the tensor."""
        spec = self.specs.get(name)
        saved_rows = self.shapes[name][0]
        same_rows = rows is None or name not in VOCAB_PARAMS or rows == saved_rows
        if tp_size == self.tp and same_rows:  # the common resume: the very shard that was saved
            return self._stored(name if key is None else f"{name}/{key}", tp_rank, key is not None, pp_rank)
        full = self.full(name, key)
        if full.dim() == 0 or spec is None:
            return full
        if name in VOCAB_PARAMS and rows is not None:
            full = fit_rows(full, rows)
        return shard_tensor(full, spec, rank=tp_rank, size=tp_size).contiguous()

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device state dict (padded vocabulary rows as saved)."""
        return {name: self.full(name) for name in self.names}


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def read_whole(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, from one sequential read into one buffer (the tensors
    are views of it). Resuming at the saved layout reads each rank's own files whole: one read at
    disk speed instead of the memory map's page-by-page faults."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buffer = torch.empty(size, dtype=torch.uint8)
            if f.readinto(memoryview(buffer.numpy())) != size:
                raise OSError("short read")
        head = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
        header = json.loads(buffer[8:8 + head].numpy().tobytes())
        data = buffer[8 + head:]
        tensors = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            dtype = _TORCH_DTYPES[entry["dtype"]]
            raw = data[start:end]
            if start % dtype.itemsize:  # a view needs an aligned offset; copy the rare odd one
                raw = raw.clone()
            tensors[key] = raw.view(dtype).reshape(entry["shape"])
        return tensors
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable tensor file: {e}") from None


def merged_state_dict(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The single-device state dict from the shards of any layout."""
    return SavedCheckpoint(step_dir).merged_state_dict()


def load_model(checkpoint_dir: str | Path):
    """(single-device GPT with the checkpoint's weights, its run config), from any layout, in
    eval mode."""
    from pretrain.models.gpt import GPT

    saved = SavedCheckpoint(checkpoint_dir)
    config = saved.config
    model = GPT(config.model, init_seed=0)
    state = model.state_dict()
    missing = sorted(set(state) - set(saved.names))
    extra = sorted(set(saved.names) - set(state))
    if missing or extra:
        raise CheckpointError(f"{saved.dir}: weights do not fit the model its config.yaml describes "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(saved.shard(name, tp_rank=0, tp_size=1, rows=tensor.shape[0]))
    return model.eval(), config
