"""Writing a checkpoint at another layout, offline (`tools/reshard_checkpoint.py`): no process
group, one tensor in memory at a time. Live runs restore at any layout through restore.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from pretrain.checkpoint.files import (
    TMP_PREFIX,
    CheckpointError,
    FileChecksum,
    StreamingTensorFile,
    model_file,
    optimizer_file,
    publish,
    remove_leftovers,
    write_meta_and_config,
)
from pretrain.checkpoint.reader import VOCAB_PARAMS, SavedCheckpoint
from pretrain.checkpoint.state import assign_parts, shard_metadata
from pretrain.config import RunConfig
from pretrain.parallel.model_chunks import stage_owners


def write_layout(
    source, target: RunConfig, output: str | Path, *, step: int, train_state: dict, data_parallel: int = 1
) -> Path:
    """Write `source` (a SavedCheckpoint, or anything with its `names`, `specs`, `has_optimizer`,
    `optimizer_keys`, `shard`) as step_N under `output` at the target config's TP/PP layout,
    split into `data_parallel` parts per position; published atomically like a training save."""
    output = Path(output)
    final = output / f"step_{step}"
    if getattr(source, "dir", None) is not None and final.resolve() == Path(source.dir).resolve():
        raise CheckpointError(f"{final} is the checkpoint being read; write to another directory")
    output.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    tmp = output / f"{TMP_PREFIX}step_{step}"
    tmp.mkdir()
    tp, pp = target.parallel.tensor, target.parallel.pipeline
    rows = target.model.vocab_rows
    checksums: dict[str, FileChecksum] = {}  # computed as the files are written: no second read
    for pp_rank in range(pp):
        names = [n for n in source.names if pp_rank in stage_owners(n, target)]
        owner = assign_parts({n: math.prod(source.shapes[n]) for n in names}, data_parallel)
        for tp_rank in range(tp):
            # One tensor in memory at a time: each goes straight to its file.
            files = [
                (
                    StreamingTensorFile(tmp / model_file(tp_rank, pp_rank, part)),
                    StreamingTensorFile(tmp / optimizer_file(tp_rank, pp_rank, part)) if source.has_optimizer else None,
                    {},
                    {},
                )
                for part in range(data_parallel)
            ]
            for name in names:
                weights, optimizer, specs, shapes = files[owner[name]]
                spec = source.specs.get(name)
                specs[name] = None if spec is None else [spec.dim, spec.parts]
                weights.add(name, source.shard(name, tp_rank=tp_rank, tp_size=tp, rows=rows))
                shapes[name] = [rows, *source.shapes[name][1:]] if name in VOCAB_PARAMS else list(source.shapes[name])
                for key in source.optimizer_keys(name) if optimizer is not None else ():
                    optimizer.add(f"{name}/{key}", source.shard(name, key, tp_rank=tp_rank, tp_size=tp, rows=rows))
            for weights, optimizer, specs, shapes in files:
                checksums[weights.path.name] = weights.close(shard_metadata(specs, shapes))
                if optimizer is not None:
                    checksums[optimizer.path.name] = optimizer.close()
    write_meta_and_config(
        tmp,
        target,
        step=step,
        data_parallel=data_parallel,
        has_optimizer=source.has_optimizer,
        has_rng=False,
        train_state=train_state,
        checksums=checksums,
    )
    publish(tmp, final)
    return final


def reshard_checkpoint(
    checkpoint: str | Path, output: str | Path, overrides: list[str], *, data_parallel: int = 1
) -> Path:
    """Write the checkpoint at another layout: `overrides` are `parallel.*=value` keys, checked as
    a training run of tensor x pipeline x data_parallel ranks would check them."""
    from pretrain.config import config_from_dict, to_dict, validate_layout

    bad = [o for o in overrides if not o.startswith("parallel.")]
    if bad:
        raise CheckpointError(f"{bad[0]}: resharding changes only parallel.* keys")
    saved = SavedCheckpoint(checkpoint)
    raw = to_dict(saved.config)
    # The padding follows the new TP size (the vocabulary tensors are cut or padded to it).
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "padded_vocab_size"}
    target = config_from_dict(raw, overrides)
    p = target.parallel
    validate_layout(target, p.tensor * p.pipeline * data_parallel)
    return write_layout(
        saved,
        target,
        output,
        step=saved.meta["step"],
        train_state=saved.meta["train_state"],
        data_parallel=data_parallel,
    )
