"""Plot a run's metrics.jsonl as a PNG: `python tools/plot_metrics.py LOG_DIR_OR_JSONL [--output F]`.

Two panels: training and validation loss against step, and tokens/s (with MFU) against step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not a JSON line ({e})") from None
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl or the logging.dir holding it")
    parser.add_argument("--output", help="PNG path (default: next to metrics.jsonl)")
    args = parser.parse_args()
    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        parser.error(f"{path} does not exist")
    records = read_records(path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        parser.error(f"{path} holds no loss records")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_speed.grid(alpha=0.3)
    ax_mfu = ax_speed.twinx()
    ax_mfu.plot([r["step"] for r in train], [100 * r["mfu"] for r in train], color="tab:orange", alpha=0.6)
    ax_mfu.set_ylabel("MFU %", color="tab:orange")
    fig.tight_layout()
    output = Path(args.output) if args.output else path.with_name("metrics.png")
    fig.savefig(output, dpi=100)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
