"""Write a checkpoint at another parallel layout, weights and optimizer state both, offline:

    python tools/reshard_checkpoint.py --checkpoint ckpt/ --output ckpt_tp4/ parallel.tensor=4 parallel.pipeline=1

Training resumes from any layout directly (`checkpoint.resume`); this is for moving a checkpoint
ahead of time, e.g. to split the files for another cluster, without starting any process group.
`--data-parallel N` splits each position's tensors into N files as N data-parallel ranks would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import reshard_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root (uses latest) or step_N dir")
    parser.add_argument("--output", required=True, help="checkpoint root to write step_N and latest into")
    parser.add_argument("--data-parallel", type=int, default=1, help="files per TP/PP position (default 1)")
    parser.add_argument("overrides", nargs="*", help="parallel.tensor=T parallel.pipeline=P ...")
    args = parser.parse_args()
    if args.data_parallel < 1:
        parser.error("--data-parallel must be >= 1")
    try:
        out = reshard_checkpoint(args.checkpoint, args.output, args.overrides, data_parallel=args.data_parallel)
    except ValueError as e:  # CheckpointError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
