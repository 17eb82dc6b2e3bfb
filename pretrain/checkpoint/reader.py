"""Reading a saved checkpoint: any tensor whole, or sliced for another layout.

`SavedCheckpoint` indexes the tensor files of one step directory (headers only; data is read
lazily through safetensors' memory map) and answers "the full tensor named X", "the shard of X
that TP rank r of t holds" or "elements [a, b) of that shard flattened", for weights and
optimizer state alike. A saved shard may be whole in one file, or spread over the DP ranks'
files as ZeRO fragments (runs of the flattened shard, with their offsets in the file metadata):
the reader puts it together from the pieces, reading only the pieces (and of them only the
ranges) a request needs. Loading into a live model (pretrain/checkpoint/reshard.py), the offline
resharder, load_model and the Hugging Face exporter all read through it.

Every file is checked against the size meta.json recorded when it is opened, and against its
CRC-32 before the first tensor is taken from it (files.Checksums): a file read whole is checked
on the buffer just read; a file read through the memory map, by one sequential read first. Only
the files a request touches are read, so a rank pays for the files it loads from, not for the
whole checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pretrain.checkpoint.files import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    Checksums,
    CorruptCheckpointError,
    FileChecksum,
    model_file,
    optimizer_file,
    read_config,
    read_meta,
    resolve_checkpoint,
)
from pretrain.config import ModelConfig, RunConfig
from pretrain.models.sharding import ShardSpec, shard_tensor, unshard_tensors

# Parameters whose rows are the (padded) vocabulary: the padding grows with the TP size, and
# padding rows take no part in the loss, so they are cut or zero-filled to fit another layout.
VOCAB_PARAMS = ("embed.weight", "head.weight")

# Model fields that decide parameter shapes; a checkpoint loads only into an equal model.
SHAPE_FIELDS = ("flavour", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size", "vocab_size", "tied")


def check_same_model(saved: ModelConfig, here: ModelConfig, where: Path) -> None:
    fields = SHAPE_FIELDS + (("positions",) if here.flavour == "gpt2" else ())  # learned positions
    differ = [
        f"model.{f}: checkpoint {getattr(saved, f)}, this run {getattr(here, f)}"
        for f in fields
        if getattr(saved, f) != getattr(here, f)
    ]
    if differ:
        raise CheckpointError(
            f"{where} holds a different model shape ({'; '.join(differ)}); use the "
            "checkpoint's model settings (its config.yaml) or start without it"
        )


def fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary tensor cut or zero-padded to `rows` rows (only padding rows change)."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] > rows:
        return full[:rows]
    out = full.new_zeros((rows, *full.shape[1:]))
    out[: full.shape[0]] = full
    return out


@dataclass(frozen=True)
class _Piece:
    """Where (part of) one saved TP shard lies: tensor `key` of the file at `path` holds
    elements [start, start + numel) of the flattened shard. A whole shard (`whole`) is stored in
    its own shape; a ZeRO fragment is 1-D."""

    path: Path
    key: str
    start: int
    numel: int
    whole: bool


class SavedCheckpoint:
    """One step directory, indexed. `names` are the model's parameter names; `has_optimizer`
    says whether optimizer state was saved (imported checkpoints hold weights only).

    `parts`: index only these (tp, pp, part) files (a ZeRO rank resuming at the saved layout
    reads its own files and nothing else); then names and completeness are those files' only."""

    def __init__(self, path: str | Path, *, parts: list[tuple[int, int, int]] | None = None) -> None:
        self.dir = resolve_checkpoint(path)
        self.meta = read_meta(self.dir)
        self.checksums = Checksums(self.dir, self.meta)
        self.config: RunConfig = read_config(self.dir, self.checksums)
        layout = self.meta["layout"]
        self.tp, self.pp, self.parts = layout["tensor"], layout["pipeline"], self.meta["parts"]
        self.has_optimizer = bool(self.meta.get("has_optimizer", True))
        self._open: dict[Path, object] = {}
        self._whole: dict[Path, dict[str, torch.Tensor]] = {}  # files read at once (read_whole_files)
        self.read_whole_files = False
        self.specs: dict[str, ShardSpec | None] = {}
        self.shapes: dict[str, list[int]] = {}
        # name -> tp rank -> pipeline rank -> the pieces of that shard (a tied embedding is on
        # two pipeline ranks; under ZeRO a shard is spread over the DP ranks' files)
        self._model: dict[str, dict[int, dict[int, list[_Piece]]]] = {}
        self._optim: dict[str, dict[int, dict[int, list[_Piece]]]] = {}  # "name/key" -> the same
        files = (
            parts
            if parts is not None
            else [(t, p, d) for t in range(self.tp) for p in range(self.pp) for d in range(self.parts)]
        )
        for tp, pp, part in files:
            self._index_model(self.dir / model_file(tp, pp, part), tp, pp)
            if self.has_optimizer:
                handle = self._handle(self.dir / optimizer_file(tp, pp, part))
                self._index(handle, self.dir / optimizer_file(tp, pp, part), tp, pp, self._optim)
        self.names = sorted(self._model)
        if parts is None:
            self._check_complete()

    # -- the index ------------------------------------------------------------------------------

    def _handle(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise CorruptCheckpointError(
                    f"{path} is missing: the checkpoint is incomplete (saved at layout {self.meta['layout']})",
                    step_dir=self.dir,
                    file=path,
                )
            self.checksums.check_size(path)
            try:
                self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # truncated or foreign file
                self.checksums.verify(path)  # a damaged header: say so when the checksum can tell
                raise CorruptCheckpointError(
                    f"{path} is not a readable tensor file: {e}", step_dir=self.dir, file=path
                ) from None
        return self._open[path]

    def blame(self) -> None:
        """Before an error about what the indexed files hold (a tensor missing, a shape that
        does not fit): raise CorruptCheckpointError instead if one of them fails its checksum,
        for a damaged header can look like a different model. Reads each file once; only on
        that error path."""
        for path in list(self._open):
            self.checksums.verify(path)

    def _damaged_header(self, path: Path, message: str) -> CheckpointError:
        """The error for metadata that does not parse: corruption when the checksum says so."""
        self.checksums.verify(path)
        return CheckpointError(message)

    def _index(self, handle, path: Path, tp: int, pp: int, into: dict) -> None:
        try:
            fragments = json.loads((handle.metadata() or {}).get("fragments", "{}"))
        except ValueError:
            raise self._damaged_header(path, f"{path} has unreadable fragment metadata") from None
        for key in handle.keys():
            if key in fragments:
                start, numel = fragments[key]
                piece = _Piece(path, key, int(start), int(numel), whole=False)
            else:
                piece = _Piece(path, key, 0, math.prod(handle.get_slice(key).get_shape()), whole=True)
            into.setdefault(key, {}).setdefault(tp, {}).setdefault(pp, []).append(piece)

    def _index_model(self, path: Path, tp: int, pp: int) -> None:
        handle = self._handle(path)
        meta = handle.metadata() or {}
        try:
            for name, spec in json.loads(meta["specs"]).items():
                self.specs[name] = ShardSpec(*spec) if spec else None
            self.shapes.update(json.loads(meta["shapes"]))
        except (KeyError, ValueError, TypeError):
            raise self._damaged_header(
                path, f"{path} has no pretrain shard metadata: not a pretrain checkpoint file"
            ) from None
        self._index(handle, path, tp, pp, self._model)

    def _shard_shape(self, name: str) -> list[int]:
        """The shape of one saved TP shard of `name`."""
        shape, spec = list(self.shapes[name]), self.specs.get(name)
        if spec is not None:
            shape[spec.dim] //= self.tp
        return shape

    def _check_complete(self) -> None:
        incomplete = [n for n, ranks in self._model.items() if len(ranks) != self.tp]
        for index, optimizer in ((self._model, False), (self._optim, True)):
            for key, ranks in index.items():
                for tp, by_pp in ranks.items():
                    for pp, pieces in by_pp.items():
                        if not self._covered(key, optimizer, pieces):
                            incomplete.append(f"{key} (tensor rank {tp}, pipeline rank {pp})")
        if incomplete:
            self.blame()
            raise CheckpointError(
                f"{self.dir}: tensors missing from some ranks' files (e.g. {incomplete[0]}): "
                "the checkpoint is incomplete"
            )

    def _covered(self, key: str, optimizer: bool, pieces: list[_Piece]) -> bool:
        if any(p.whole for p in pieces):
            return True
        name = key.rsplit("/", 1)[0] if optimizer else key
        return _covers(pieces, 0, math.prod(self._shard_shape(name)))

    def _pieces(self, key: str, tp: int, optimizer: bool, pp: int | None) -> list[_Piece]:
        """The pieces of the saved shard `key` of TP rank tp, from pipeline rank pp's files when
        they hold it."""
        index = self._optim if optimizer else self._model
        if key not in index or tp not in index[key]:
            kind = "optimizer state" if optimizer else "weight"
            raise CheckpointError(f"{self.dir} has no {kind} '{key}' for tensor rank {tp} (a different model shape?)")
        by_pp = index[key][tp]
        return by_pp.get(pp, next(iter(by_pp.values())))

    def has_range(
        self, name: str, key: str | None, *, tp_rank: int, pp_rank: int | None, start: int, numel: int
    ) -> bool:
        """Whether the indexed files hold elements [start, start + numel) of the flattened saved
        shard (metadata only; nothing is read)."""
        stored, optimizer = (name, False) if key is None else (f"{name}/{key}", True)
        by_pp = (self._optim if optimizer else self._model).get(stored, {}).get(tp_rank)
        if not by_pp:
            return False
        pieces = by_pp.get(pp_rank, next(iter(by_pp.values())))
        return any(p.whole for p in pieces) or _covers(pieces, start, start + numel)

    # -- tensors ----------------------------------------------------------------------------------

    def optimizer_keys(self, name: str) -> list[str]:
        prefix = f"{name}/"
        return sorted(k[len(prefix) :] for k in self._optim if k.startswith(prefix))

    def _read(self, piece: _Piece, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """The piece's tensor, or its flattened elements [lo, hi) (only those are read)."""
        if self.read_whole_files:
            if piece.path not in self._whole:
                self._whole[piece.path] = self._read_whole(piece.path)
            t = self._whole[piece.path][piece.key]
            return t if lo is None else t.reshape(-1)[lo:hi]
        self.checksums.verify(piece.path)
        handle = self._handle(piece.path)
        if lo is None:
            return handle.get_tensor(piece.key)
        view = handle.get_slice(piece.key)
        shape = view.get_shape()
        if len(shape) <= 1:
            return view[lo:hi]
        # A whole shard: read the rows the range touches (safetensors slices the first dimension).
        row = math.prod(shape[1:])
        first, last = lo // row, -(-hi // row)
        return view[first:last].reshape(-1)[lo - first * row : hi - first * row]

    def _read_whole(self, path: Path) -> dict[str, torch.Tensor]:
        """A file read whole, checked against its checksum on the very bytes read."""
        try:
            tensors = read_whole(path)
        except CheckpointError:
            self.checksums.verify(path)  # damage the checksum can name
            raise
        checksum = getattr(tensors, "checksum", None)
        if checksum is not None:
            self.checksums.check(path, checksum)
        else:  # read_whole replaced (tests record the files read): check by a read of its own
            self.checksums.verify(path)
        return tensors

    def _stored(self, key: str, tp: int, optimizer: bool, pp: int | None = None) -> torch.Tensor:
        """The saved shard `key` of TP rank tp, from pipeline rank pp's files when they hold it."""
        pieces = self._pieces(key, tp, optimizer, pp)
        whole = next((p for p in pieces if p.whole), None)
        if whole is not None:
            return self._read(whole)
        shape = self._shard_shape(key.rsplit("/", 1)[0] if optimizer else key)
        return self._flat(pieces, 0, math.prod(shape), key).view(shape)

    def _flat(self, pieces: list[_Piece], start: int, numel: int, key: str) -> torch.Tensor:
        """Elements [start, start + numel) of a flattened shard, from the pieces overlapping them."""
        end = start + numel
        parts = [
            (max(start, p.start), min(end, p.start + p.numel), p)
            for p in pieces
            if p.start < end and start < p.start + p.numel
        ]
        if not _covers([p for _, _, p in parts], start, end):
            raise CheckpointError(
                f"{self.dir}: elements {start}-{end} of '{key}' are in no file read here (the checkpoint is incomplete)"
            )
        if len(parts) == 1:  # within one piece: a view where the data is already in memory
            lo, hi, p = parts[0]
            return self._read(p, lo - p.start, hi - p.start)
        out = None
        for lo, hi, p in parts:
            t = self._read(p, lo - p.start, hi - p.start)
            if out is None:
                out = torch.empty(numel, dtype=t.dtype)
            out[lo - start : hi - start] = t
        return out

    def full(self, name: str, key: str | None = None) -> torch.Tensor:
        """The unsharded weight `name`, or its optimizer state `key` (exp_avg, step, ...)."""
        stored = name if key is None else f"{name}/{key}"
        spec = self.specs.get(name)
        first = self._stored(stored, 0, key is not None)
        if spec is None or self.tp == 1 or first.dim() == 0:  # replicated, or a scalar such as step
            return first
        return unshard_tensors([first] + [self._stored(stored, t, key is not None) for t in range(1, self.tp)], spec)

    def shard(
        self,
        name: str,
        key: str | None = None,
        *,
        tp_rank: int,
        tp_size: int,
        rows: int | None = None,
        pp_rank: int | None = None,
    ) -> torch.Tensor:
        """What TP rank tp_rank of tp_size holds of `name` (or of its state `key`); `rows`: the
        vocabulary rows (padded) the target layout has, for the vocabulary tensors; `pp_rank`:
        read from that pipeline rank's files where they hold the tensor."""
        spec = self.specs.get(name)
        if self._same_shard(name, tp_size, rows):  # the common resume: the very shard that was saved
            return self._stored(name if key is None else f"{name}/{key}", tp_rank, key is not None, pp_rank)
        full = self.full(name, key)
        if full.dim() == 0 or spec is None:
            return full
        if name in VOCAB_PARAMS and rows is not None:
            full = fit_rows(full, rows)
        return shard_tensor(full, spec, rank=tp_rank, size=tp_size).contiguous()

    def shard_range(
        self,
        name: str,
        key: str | None = None,
        *,
        tp_rank: int,
        tp_size: int,
        start: int,
        numel: int,
        rows: int | None = None,
        pp_rank: int | None = None,
    ) -> torch.Tensor:
        """Elements [start, start + numel) of `shard(...)` flattened (a ZeRO rank's fragment). At
        the saved TP size only the pieces overlapping the range are read, and of those only the
        range; at another TP size the tensor is put together first (one tensor at a time)."""
        if self._same_shard(name, tp_size, rows):
            stored = name if key is None else f"{name}/{key}"
            return self._flat(self._pieces(stored, tp_rank, key is not None, pp_rank), start, numel, stored)
        return self.shard(name, key, tp_rank=tp_rank, tp_size=tp_size, rows=rows, pp_rank=pp_rank).reshape(-1)[
            start : start + numel
        ]

    def _same_shard(self, name: str, tp_size: int, rows: int | None) -> bool:
        same_rows = rows is None or name not in VOCAB_PARAMS or rows == self.shapes[name][0]
        return tp_size == self.tp and same_rows

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device state dict (padded vocabulary rows as saved)."""
        return {name: self.full(name) for name in self.names}


def _covers(pieces: list[_Piece], start: int, end: int) -> bool:
    """Whether the pieces' runs, together, cover [start, end) (DP partitions, which never overlap,
    except the runs of zb-v's two equal tied embedding copies, pretrain/checkpoint/state.py)."""
    at = start
    for p in sorted(pieces, key=lambda p: p.start):
        if p.start > at:
            return False
        at = max(at, p.start + p.numel)
        if at >= end:
            return True
    return at >= end


_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class FileTensors(dict):
    """The tensors of one file read whole, and the file's size and CRC-32 (`checksum`), computed
    from the same buffer: checking a file that is read whole anyway costs no second read."""

    checksum: FileChecksum | None = None


def read_whole(path: Path) -> FileTensors:
    """Every tensor of a safetensors file, from one sequential read into one buffer (the tensors
    are views of it). Resuming at the saved layout reads each rank's own files whole: one read at
    disk speed instead of the memory map's page-by-page faults."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buffer = torch.empty(size, dtype=torch.uint8)
            if f.readinto(memoryview(buffer.numpy())) != size:
                raise OSError("short read")
        tensors = FileTensors()
        tensors.checksum = FileChecksum(size, zlib.crc32(memoryview(buffer.numpy())))
        head = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
        header = json.loads(buffer[8 : 8 + head].numpy().tobytes())
        data = buffer[8 + head :]
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
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{path} is not a readable tensor file: {e}", step_dir=path.parent, file=path
        ) from None


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
        raise CheckpointError(
            f"{saved.dir}: weights do not fit the model its config.yaml describes "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(saved.shard(name, tp_rank=0, tp_size=1, rows=tensor.shape[0]))
    return model.eval(), config
