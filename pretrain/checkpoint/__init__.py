"""Checkpoints: distributed, asynchronous, atomically published, loadable at any layout.

files.py    on-disk layout, safe tensor files, checksums, atomic publish, `latest`, pruning
saver.py    snapshot to host + (background) parallel write by every rank; failed saves
reader.py   index a checkpoint; any tensor whole or sliced for another layout; load_model
state.py    what a rank's checkpoint holds, as its training strategy keeps it (replicated or
            partitioned), and its snapshot for a save; load_checkpoint
restore.py  restore a live run at any layout
reshard.py  write a checkpoint at another layout, offline
fallback.py load the newest checkpoint no rank finds damaged
"""

from pretrain.checkpoint.fallback import checkpoint_candidates, load_newest_intact
from pretrain.checkpoint.files import (
    FORMAT_VERSION,
    LATEST,
    CheckpointError,
    CorruptCheckpointError,
    find_resume_checkpoint,
    prune_checkpoints,
    read_config,
    read_meta,
    resolve_checkpoint,
)
from pretrain.checkpoint.reader import SavedCheckpoint, load_model, merged_state_dict
from pretrain.checkpoint.reshard import reshard_checkpoint, write_layout
from pretrain.checkpoint.saver import Checkpointer, CheckpointSaveError, save_checkpoint
from pretrain.checkpoint.state import PartitionedState, ReplicatedState, load_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "PartitionedState",
    "ReplicatedState",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "CorruptCheckpointError",
    "SavedCheckpoint",
    "checkpoint_candidates",
    "find_resume_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_newest_intact",
    "merged_state_dict",
    "prune_checkpoints",
    "read_config",
    "read_meta",
    "reshard_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_layout",
]
