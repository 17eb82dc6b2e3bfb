"""Export a checkpoint as a Hugging Face transformers model directory.

    python tools/convert_to_hf.py --checkpoint CHECKPOINTS --output hf_model

CHECKPOINTS is a checkpoint root (its `latest` is used) or a step_N directory, saved at any
tensor/pipeline-parallel layout. The output loads offline with
`AutoModelForCausalLM.from_pretrained(hf_model)` (LlamaForCausalLM, Qwen2ForCausalLM for a
llama with model.qkv_bias, or GPT2LMHeadModel; Llama 3 rope_scaling is written in both
transformers 4.x and 5.x keys) and
`AutoTokenizer.from_pretrained(hf_model)`, which encodes text to the ids training used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.hf import cli_error, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root (uses latest) or step_N directory")
    parser.add_argument("--output", required=True, help="directory to write the transformers model to")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --output (overwrites the "
        "files an export writes, removes stale weight files, leaves other files)",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="export weights that hold NaN or Inf (refused by default: a diverged run)",
    )
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.output, force=args.force, allow_non_finite=args.allow_non_finite)
    except ValueError as e:  # CheckpointError, HFConversionError, ConfigError: user mistakes
        return cli_error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
