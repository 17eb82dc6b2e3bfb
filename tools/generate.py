"""Print a sample from a checkpoint: `python tools/generate.py --checkpoint DIR --prompt TEXT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import CheckpointError, load_model
from pretrain.data.tokenizer import load_tokenizer
from pretrain.generate import generate, heal_prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root (uses latest) or step_N dir")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--tokenizer", help="tokenizer model (default: the one in the run config)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-heal",
        action="store_true",
        help="keep the prompt's last token as encoded (default: drawn again among the tokens extending its text)",
    )
    args = parser.parse_args()
    try:
        model, config = load_model(args.checkpoint)
    except CheckpointError as e:
        parser.error(str(e))
    tokenizer_path = args.tokenizer or config.data.tokenizer
    if not tokenizer_path or not Path(tokenizer_path).is_file():
        parser.error(f"tokenizer {tokenizer_path!r} not found; pass --tokenizer MODEL")
    tokenizer = load_tokenizer(tokenizer_path)
    if args.no_heal:
        prompt, first_tokens = tokenizer.encode(args.prompt), None
    else:
        prompt, first_tokens = heal_prompt(tokenizer, args.prompt)
    ids = generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop_token=tokenizer.eod,
        first_tokens=first_tokens,
    )
    print(tokenizer.decode(prompt + ids) if first_tokens is not None else args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
