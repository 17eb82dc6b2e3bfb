"""The files of a checkpoint on disk: names, safe tensor files, metadata, and atomic publishing.

Layout of one checkpoint, `{checkpoint.dir}/step_N/`:
  meta.json                             format version, step, layout, trainer state; written last
  config.yaml                           the whole run config, so a checkpoint alone rebuilds its model
  model_tp{T}_pp{P}_part{D}.safetensors      weights held at TP rank T, pipeline rank P, written
                                             by DP rank D; each file's metadata records every
                                             tensor's shard spec and full (unsharded) shape
  optimizer_tp{T}_pp{P}_part{D}.safetensors  the optimizer state of the same tensors, keyed
                                             `{name}/{state key}` (exp_avg, exp_avg_sq, step)
  rng_rank{R}.pt                        every rank's RNG states
`{checkpoint.dir}/latest` names the newest complete checkpoint.

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
from pathlib import Path
from typing import Optional

import torch
import yaml

from pretrain.config import RunConfig, config_from_dict

FORMAT_VERSION = 3  # 3: ZeRO checkpoints hold each DP rank's fragments (2: gathered, whole shards)
READABLE_VERSIONS = (2, 3)
LATEST = "latest"
TMP_PREFIX = ".tmp-"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says which and why."""


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


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a CPU tensor's memory: no copy on the way to the file."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _header(entries: dict[str, dict], metadata: Optional[dict[str, str]]) -> bytes:
    """The safetensors prefix: 8-byte little-endian length, then the JSON header, padded so the
    data starts 8-byte aligned."""
    head = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def _entries(tensors) -> tuple[dict[str, dict], int]:
    entries, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return entries, offset


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> int:
    """Write tensors (CPU, contiguous) as a safetensors file and fsync it; returns the bytes
    written. Format: 8-byte little-endian header length, JSON header, then the raw data."""
    entries, size = _entries(tensors.items())
    prefix = _header(entries, metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            if t.numel():
                f.write(_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return len(prefix) + size


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

    def close(self, metadata: Optional[dict[str, str]] = None) -> None:
        self.file.close()
        with open(self.path, "wb") as out, open(self.side, "rb") as data:
            out.write(_header(self.entries, metadata))
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.side.unlink()


def write_meta_and_config(directory: Path, config: RunConfig, *, step: int, data_parallel: int,
                          has_optimizer: bool, has_rng: bool, train_state: dict) -> None:
    """config.yaml, then meta.json, whose presence marks the checkpoint complete: written last."""
    p = config.parallel
    meta = {"format_version": FORMAT_VERSION, "step": step,
            "layout": {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_stages": p.virtual_stages,
                       "data": data_parallel, "zero_stage": p.zero_stage},
            "world_size": p.tensor * p.pipeline * data_parallel, "parts": data_parallel,
            "has_optimizer": has_optimizer, "has_rng": has_rng, "train_state": train_state}
    write_file(directory / "config.yaml", config_yaml(config))
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


def find_resume_checkpoint(root: str, resume: str, *, warn=None) -> Optional[Path]:
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
                raise CheckpointError(f"{Path(root) / LATEST} is unusable ({e}) and {root} holds no complete "
                                      "checkpoint: delete it to start from scratch") from None
            problem = f"{Path(root) / LATEST} is unusable ({e})"
    elif steps:
        problem = f"{root} has no '{LATEST}' pointer"
    if problem is None:
        return None
    if warn is not None:
        warn(f"warning: {problem}; resuming from the newest complete checkpoint, {steps[-1][1]}")
    return steps[-1][1]


def read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((Path(step_dir) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta.json is unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{step_dir}/meta.json: expected a JSON object, got {type(meta).__name__}; the "
                              "checkpoint is damaged: resume from an earlier step_N/ (checkpoint.resume=PATH)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{step_dir} has checkpoint format version {version}; this version of "
                              f"pretrain reads versions {', '.join(map(str, READABLE_VERSIONS))} (convert it "
                              "with the pretrain release that wrote it: load_model + tools/convert_to_hf.py, "
                              "then tools/convert_from_hf.py here)")
    check_meta_fields(meta, where=f"{step_dir}/meta.json")
    return meta


# What write_meta_and_config always writes and the readers index without .get(): a meta.json
# missing one (hand-edited, or written by a tool gone wrong) must not surface as a KeyError.
REQUIRED_META = {"step": int, "layout": dict, "world_size": int, "parts": int, "train_state": dict}
REQUIRED_LAYOUT = ("tensor", "pipeline")


def check_meta_fields(meta: dict, *, where: str) -> None:
    """Raise CheckpointError naming `where` and the first missing or mistyped field."""
    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {problem}; the checkpoint is damaged or was not written by pretrain: "
                               "resume from an earlier step_N/ (checkpoint.resume=PATH)")

    for key, kind in REQUIRED_META.items():
        if key not in meta:
            raise damaged(f"missing field '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise damaged(f"field '{key}' should be a {kind.__name__}, got {meta[key]!r}")
    for key in REQUIRED_LAYOUT:
        if key not in meta["layout"]:
            raise damaged(f"missing field 'layout.{key}'")


def read_config(step_dir: Path) -> RunConfig:
    try:
        raw = yaml.safe_load((Path(step_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{step_dir}/config.yaml is unreadable: {e}") from None
    return config_from_dict(raw)


def config_yaml(config: RunConfig) -> bytes:
    from pretrain.config import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False).encode()


def load_pt(path: Path):
    """A small torch file (RNG states), read with weights_only=True: no code runs from it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors, or a damaged file
        raise CheckpointError(f"{path} cannot be loaded safely: {e}") from None
