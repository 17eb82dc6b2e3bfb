"""Import a local Hugging Face LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel directory as a
checkpoint. Llama 3.x rope scaling (rope_type llama3) is accepted; other RoPE scaling types,
sliding-window attention and biases our model lacks are refused naming the config.json key.

    python tools/convert_from_hf.py --input hf_model --output checkpoints parallel.tensor=2 parallel.pipeline=2

writes checkpoints/step_0 (weights only: training starts with a fresh optimizer) at the layout
the `key=value` overrides choose, with a run config built from the model's config.json and
data.tokenizer pointing at a copy of its tokenizer. Other run settings can be overridden too
(model.seq_length=1024, train.steps=...), but not the ones the weights fix (model sizes).
Only safetensors weights are read: pickled .bin files are refused. Train on it with

    python -m pretrain.train checkpoints/step_0/config.yaml data.path=PREFIX checkpoint.resume=checkpoints/step_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.hf import cli_error, import_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        required=True,
        help="local Hugging Face model directory (config.json + model.safetensors or model.safetensors.index.json)",
    )
    parser.add_argument("--output", required=True, help="checkpoint directory to write step_0 under")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="run config overrides, e.g. parallel.tensor=2 parallel.pipeline=2",
    )
    args = parser.parse_args(argv)
    try:
        import_checkpoint(args.input, args.output, args.overrides, force=args.force)
    except ValueError as e:  # HFConversionError, ConfigError, CheckpointError: user mistakes
        return cli_error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
