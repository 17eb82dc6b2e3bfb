"""The files of a checkpoint on disk: names, safe tensor files, metadata, and atomic publishing.

Layout of one checkpoint, `{checkpoint.dir}/step_N/`:
  meta.json                             format version, step, layout, trainer state; written last
  config.yaml                           the whole run config, so a checkpoint alone rebuilds its model
  model_tp{T}_pp{P}_part{D}.safetensors      weights held at TP rank T, pipeline rank P, written
                                             by replica D (the data x context rank: topology.py);
                                             each file's metadata records every tensor's shard
                                             spec and full (unsharded) shape
  optimizer_tp{T}_pp{P}_part{D}.safetensors  the optimizer state of the same tensors, keyed
                                             `{name}/{state key}` (exp_avg, exp_avg_sq, step)
  rng_rank{R}.pt                        every rank's RNG states
`{checkpoint.dir}/latest` names the newest complete checkpoint.

meta.json's `checksums` maps every other file of the checkpoint to its size and CRC-32, taken
while the file was written (no second read at save). Readers check a file's size when they
open it and its CRC-32 before they trust data read from it, once per file and only for the
files a rank reads (`Checksums`): a mismatch raises CorruptCheckpointError naming the file.
Checkpoints written before checksums existed have none and load unverified.

Tensors are keyed by their global parameter names and stored as TP shards. Without ZeRO the DP
replicas of a position split its (whole) shards between them and write in parallel. Under ZeRO
(format 3) each DP rank writes its own partition: per parameter the fp32 master and Adam moments
of a run of the flattened TP shard, as a 1-D tensor, with `fragments` in the file metadata
mapping each key to [start, numel] of that run. Either way a checkpoint can be loaded at any DP
size, ZeRO stage and TP/PP layout (pretrain/checkpoint/reader.py puts shards together from
their pieces; reshard.py).

Tensor files are safetensors, written here as one streaming pass over the tensors' bytes (the
library's writer builds the whole file in memory first) and read through the safetensors
library, lazily: a rank reads only the slices it needs, and nothing in them can run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pretrain.config import RunConfig, config_from_dict

FORMAT_VERSION = 3  # 3: ZeRO checkpoints hold each DP rank's fragments (2: gathered, whole shards)
READABLE_VERSIONS = (2, 3)
LATEST = "latest"
TMP_PREFIX = ".tmp-"

# The safetensors header names of the dtypes a checkpoint holds (reader.py reads them back).
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says which and why."""


class CorruptCheckpointError(CheckpointError):
    """A file of a checkpoint is damaged: its checksum or size differs from what meta.json
    recorded at save, or it is missing or unreadable. `step_dir` is the checkpoint directory,
    `file` the bad file's path; the message names both. An earlier checkpoint may still be
    intact (pretrain.checkpoint.load_newest_intact falls back to it)."""

    def __init__(self, message: str, *, step_dir: str | Path, file: str | Path) -> None:
        super().__init__(message)
        self.step_dir, self.file = Path(step_dir), Path(file)

    def __reduce__(self):  # picklable (multiprocessing hands exceptions between processes)
        return _corrupt, (str(self), str(self.step_dir), str(self.file))


def _corrupt(message: str, step_dir: str, file: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, step_dir=step_dir, file=file)


# CRC-32 guards against accidents (a flipped bit on a disk or in a network file system, a file
# cut short by a full disk or a crash, a copy gone wrong), not against an adversary who would
# forge a matching file: for those a 32-bit check detects every burst of up to 32 bits and any
# other damage with probability 1 - 2^-32. zlib's runs at ~2 GB/s per core and releases the GIL
# on large buffers, so computing it as the bytes stream to disk costs the writer thread little.
CHECKSUM = "crc32"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class FileChecksum:
    """The size and CRC-32 of one written file, as meta.json records it."""

    size: int
    crc32: int

    def to_json(self) -> dict:
        return {"bytes": self.size, CHECKSUM: f"{self.crc32:08x}"}


def model_file(tp: int, pp: int, part: int) -> str:
    return f"model_tp{tp}_pp{pp}_part{part}.safetensors"


def optimizer_file(tp: int, pp: int, part: int) -> str:
    return f"optimizer_tp{tp}_pp{pp}_part{part}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> FileChecksum:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileChecksum(len(data), zlib.crc32(data))


def _bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a CPU tensor's memory: no copy on the way to the file."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _header(entries: dict[str, dict], metadata: dict[str, str] | None) -> bytes:
    """The safetensors prefix: 8-byte little-endian length, then the JSON header, padded so the
    data starts 8-byte aligned."""
    head = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def _entries(tensors) -> tuple[dict[str, dict], int]:
    entries, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return entries, offset


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> FileChecksum:
    """Write tensors (CPU, contiguous) as a safetensors file and fsync it; returns its size and
    CRC-32, folded in as the bytes go out. Format: 8-byte little-endian header length, JSON
    header, then the raw data."""
    entries, size = _entries(tensors.items())
    prefix = _header(entries, metadata)
    crc = zlib.crc32(prefix)
    with open(path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            if t.numel():
                data = _bytes(t)
                crc = zlib.crc32(data, crc)
                f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileChecksum(len(prefix) + size, crc)


class StreamingTensorFile:
    """A safetensors file built one tensor at a time, holding none of them: the data goes to a
    side file as the tensors come, and the header (which comes first in the format) is written
    with a copy of the data once the set is complete. For offline tools that produce a whole
    model's tensors one by one (a 13B model at one TP/PP position would not fit in memory)."""

    def __init__(self, path: Path) -> None:
        self.path, self.side = path, path.with_name(path.name + ".data")
        self.file = open(self.side, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        entry, nbytes = _entries([(name, t)])
        entry[name]["data_offsets"] = [self.size, self.size + nbytes]
        self.entries.update(entry)
        if nbytes:
            self.file.write(_bytes(t))
        self.size += nbytes

    def close(self, metadata: dict[str, str] | None = None) -> FileChecksum:
        """Write the file (header, then the data); returns its size and CRC-32."""
        self.file.close()
        prefix = _header(self.entries, metadata)
        crc, size = zlib.crc32(prefix), len(prefix)
        with open(self.path, "wb") as out, open(self.side, "rb") as data:
            out.write(prefix)
            while chunk := data.read(_CHUNK):  # the copy there is anyway: its CRC on the way
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        self.side.unlink()
        return FileChecksum(size, crc)


def write_meta_and_config(
    directory: Path,
    config: RunConfig,
    *,
    step: int,
    data_parallel: int,
    has_optimizer: bool,
    has_rng: bool,
    train_state: dict,
    checksums: dict[str, FileChecksum] | None = None,
    context: int = 1,
) -> None:
    """config.yaml, then meta.json, whose presence marks the checkpoint complete: written last.
    `checksums`: file name -> FileChecksum of every tensor and RNG file written (config.yaml's
    is added here); recorded in meta.json. The data x `context` ranks of a position each write
    one part (context-parallel ranks are replicas like data-parallel ones)."""
    p = config.parallel
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "layout": {
            "tensor": p.tensor,
            "pipeline": p.pipeline,
            "virtual_stages": p.virtual_stages,
            "data": data_parallel,
            "context": context,
            "zero_stage": p.zero_stage,
        },
        "world_size": p.tensor * p.pipeline * data_parallel * context,
        "parts": data_parallel * context,
        "has_optimizer": has_optimizer,
        "has_rng": has_rng,
        "train_state": train_state,
    }
    config_sum = write_file(directory / "config.yaml", config_yaml(config))
    if checksums is not None:
        sums = {**checksums, "config.yaml": config_sum}
        meta["checksums"] = {name: sums[name].to_json() for name in sorted(sums)}
    write_file(directory / "meta.json", json.dumps(meta, indent=1).encode())


def publish(tmp: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint into place, then point `latest` at it. A crash at
    any moment leaves `latest` naming a complete checkpoint (the old one until the new pointer
    replaces it atomically)."""
    root = final.parent
    fsync_dir(tmp)
    if final.exists():  # re-saving a step (a resumed run's final save): move the old one aside
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final.name}-", dir=root))
        final.rename(trash / "old")
        shutil.rmtree(trash)
    tmp.rename(final)
    pointer = root / f"{TMP_PREFIX}{LATEST}"
    write_file(pointer, f"{final.name}\n".encode())
    os.replace(pointer, root / LATEST)
    fsync_dir(root)


def remove_leftovers(root: Path) -> None:
    """Delete what interrupted saves left behind (never a published checkpoint)."""
    for path in root.glob(f"{TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    steps = []
    for path in root.glob("step_*"):
        suffix = path.name.split("_", 1)[1]
        if suffix.isdigit() and (path / "meta.json").is_file():
            steps.append((int(suffix), path))
    return sorted(steps)


def prune_checkpoints(root: str | Path, *, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (never the one `latest` names)."""
    if keep_last <= 0:
        return
    root = Path(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    for _, path in complete_steps(root)[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a checkpoint root whose `latest` names one -> the step directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        step_dir = path / pointer.read_text().strip()
        if (step_dir / "meta.json").is_file():
            return step_dir
        raise CheckpointError(f"{pointer} names {step_dir.name}, which is missing or incomplete")
    raise CheckpointError(f"{path} is not a checkpoint: no meta.json and no '{LATEST}' file in it")


def find_resume_checkpoint(root: str, resume: str, *, warn=None) -> Path | None:
    """Which checkpoint checkpoint.resume asks for: None for a fresh start. With `auto`, a
    missing or unusable `latest` beside complete step_N/ directories resumes from the newest of
    them (`warn(message)` says so): checkpoints on disk are never taken for a fresh start."""
    if resume == "none":
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    if not root or not Path(root).is_dir():
        return None
    steps = complete_steps(Path(root))
    problem = None
    if (Path(root) / LATEST).exists():
        try:
            chosen = resolve_checkpoint(root)
            if not steps or steps[-1][1] == chosen or chosen not in [path for _, path in steps]:
                return chosen
            # A save that crashed between publishing step_N and moving `latest` to it.
            problem = f"{Path(root) / LATEST} names {chosen.name}, but {steps[-1][1].name} is newer and complete"
        except (CheckpointError, OSError, UnicodeDecodeError) as e:
            if not steps:
                raise CheckpointError(
                    f"{Path(root) / LATEST} is unusable ({e}) and {root} holds no complete "
                    "checkpoint: delete it to start from scratch"
                ) from None
            problem = f"{Path(root) / LATEST} is unusable ({e})"
    elif steps:
        problem = f"{root} has no '{LATEST}' pointer"
    if problem is None:
        return None
    if warn is not None:
        warn(f"warning: {problem}; resuming from the newest complete checkpoint, {steps[-1][1]}")
    return steps[-1][1]


def read_meta(step_dir: Path) -> dict:
    where = Path(step_dir) / "meta.json"
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{where} is unreadable: {e}", step_dir=step_dir, file=where) from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(
            f"{where}: expected a JSON object, got {type(meta).__name__}; the checkpoint "
            "is damaged: resume from an earlier step_N/ (checkpoint.resume=PATH)",
            step_dir=step_dir,
            file=where,
        )
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{step_dir} has checkpoint format version {version}; this version of "
            f"pretrain reads versions {', '.join(map(str, READABLE_VERSIONS))} (convert it "
            "with the pretrain release that wrote it: load_model + tools/convert_to_hf.py, "
            "then tools/convert_from_hf.py here)"
        )
    check_meta_fields(meta, where=f"{step_dir}/meta.json")
    if not isinstance(meta.get("checksums", {}), dict):
        raise CorruptCheckpointError(f"{where}: field 'checksums' should be a mapping", step_dir=step_dir, file=where)
    return meta


# What write_meta_and_config always writes and the readers index without .get(): a meta.json
# missing one (hand-edited, or written by a tool gone wrong) must not surface as a KeyError.
REQUIRED_META = {"step": int, "layout": dict, "world_size": int, "parts": int, "train_state": dict}
REQUIRED_LAYOUT = ("tensor", "pipeline")


def check_meta_fields(meta: dict, *, where: str) -> None:
    """Raise CheckpointError naming `where` and the first missing or mistyped field."""

    def damaged(problem: str) -> CheckpointError:
        return CorruptCheckpointError(
            f"{where}: {problem}; the checkpoint is damaged or was not written by "
            "pretrain: resume from an earlier step_N/ (checkpoint.resume=PATH)",
            step_dir=Path(where).parent,
            file=where,
        )

    for key, kind in REQUIRED_META.items():
        if key not in meta:
            raise damaged(f"missing field '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise damaged(f"field '{key}' should be a {kind.__name__}, got {meta[key]!r}")
    for key in REQUIRED_LAYOUT:
        if key not in meta["layout"]:
            raise damaged(f"missing field 'layout.{key}'")


def read_config(step_dir: Path, checksums: Checksums | None = None) -> RunConfig:
    """The run config saved with a checkpoint; verified against `checksums` when given."""
    path = Path(step_dir) / "config.yaml"
    try:
        data = path.read_bytes()
        if checksums is not None:
            checksums.verify_bytes(path, data)
        raw = yaml.safe_load(data.decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CorruptCheckpointError(f"{path} is unreadable: {e}", step_dir=step_dir, file=path) from None
    return config_from_dict(raw)


def config_yaml(config: RunConfig) -> bytes:
    from pretrain.config import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False).encode()


def load_pt(path: Path, checksums: Checksums | None = None):
    """A small torch file (RNG states), read with weights_only=True: no code runs from it;
    verified against `checksums` when given."""
    import io

    if not path.is_file():
        raise CorruptCheckpointError(
            f"{path} is missing: the checkpoint is incomplete", step_dir=path.parent, file=path
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{path} is unreadable: {e}", step_dir=path.parent, file=path) from None
    if checksums is not None:
        checksums.verify_bytes(path, data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors, or a damaged file
        raise CorruptCheckpointError(f"{path} cannot be loaded safely: {e}", step_dir=path.parent, file=path) from None


class Checksums:
    """The sizes and CRC-32s meta.json recorded for a checkpoint's files, and which files this
    process has verified against them (each once). Without a `checksums` entry in meta.json (a
    checkpoint from before they existed) nothing is checked."""

    def __init__(self, step_dir: str | Path, meta: dict) -> None:
        self.dir = Path(step_dir)
        self.expected: dict[str, dict] = meta.get("checksums") or {}
        self.verified: set[str] = set()

    def _entry(self, path: Path) -> dict | None:
        entry = self.expected.get(path.name)
        if entry is None:
            return None
        try:
            return {"bytes": int(entry["bytes"]), CHECKSUM: int(entry[CHECKSUM], 16)}
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{self.dir}/meta.json: unreadable checksum entry for {path.name}: {entry!r}",
                step_dir=self.dir,
                file=self.dir / "meta.json",
            ) from None

    def _bad(self, path: Path, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint {self.dir} is damaged: {path} {problem}; an earlier checkpoint may be intact",
            step_dir=self.dir,
            file=path,
        )

    def check_size(self, path: Path) -> None:
        """Compare the file's size on disk with the recorded one (a stat: cheap enough for every
        file a rank opens, and it catches files cut short before anything reads them)."""
        entry = self._entry(path)
        if entry is None:
            return
        try:
            size = path.stat().st_size
        except OSError as e:
            raise self._bad(path, f"cannot be read ({e})") from None
        if size != entry["bytes"]:
            raise self._bad(path, f"has {size} bytes, {entry['bytes']} were written (truncated or overwritten)")

    def check(self, path: Path, checksum: FileChecksum) -> None:
        """Compare a file's size and CRC-32, computed from bytes already read, with the record."""
        entry = self._entry(path)
        if entry is None or path.name in self.verified:
            return
        if checksum.size != entry["bytes"]:
            raise self._bad(path, f"has {checksum.size} bytes, {entry['bytes']} were written (truncated?)")
        if checksum.crc32 != entry[CHECKSUM]:
            raise self._bad(
                path, f"fails its checksum (CRC-32 {checksum.crc32:08x}, {entry[CHECKSUM]:08x} recorded at save)"
            )
        self.verified.add(path.name)

    def verify_bytes(self, path: Path, data) -> None:
        self.check(path, FileChecksum(len(data), zlib.crc32(data)))

    def verify(self, path: Path) -> None:
        """Read the file once, sequentially, and check it (before the memory-mapped reads of a
        few of its tensors, which never see the whole file)."""
        if self._entry(path) is None or path.name in self.verified:
            return
        crc, size = 0, 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
        except OSError as e:
            raise self._bad(path, f"cannot be read ({e})") from None
        self.check(path, FileChecksum(size, crc))
