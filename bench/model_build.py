"""Peak host memory while building a model: GPT(...) (fp32, then cast to 16 bits as DeepSpeed
does under ZeRO with bf16) against pretrain.models.build.build_gpt (meta, then each parameter
created on its device in its final dtype).

Each variant runs in a fresh process that resets its peak resident set (`echo 5 >
/proc/self/clear_refs`) once torch and the config are loaded, builds the model, and reads
VmHWM from /proc/self/status: the figure is the peak minus the resident set before the build.
On a GPU the same transient is device memory; the CPU shows its size.

    python bench/model_build.py                       # ~1.1B parameters (llama, h2048, 20 layers)
    python bench/model_build.py --layers 2 --hidden 256 --vocab 1000     # seconds
    python bench/model_build.py --meta configs/gpt_13b.yaml --tp 4       # sizes only, no allocation

Last line: `RESULT model_build params_m=... old_bf16_peak_gb=... new_bf16_peak_gb=...
old_fp32_peak_gb=... new_fp32_peak_gb=... ratio=<old bf16 peak / new bf16 peak>`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("old_fp32", "new_fp32", "old_bf16", "new_bf16")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _model_config(args):
    from pretrain.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "flavour": "llama",
                "num_layers": args.layers,
                "hidden_size": args.hidden,
                "num_heads": args.hidden // 128 or 1,
                "vocab_size": args.vocab,
                "seq_length": 2048,
            }
        }
    ).model


def child(args) -> dict:
    from pretrain.models.build import build_gpt
    from pretrain.models.gpt import GPT

    config = _model_config(args)
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    old, bits = args.variant.split("_")
    dtype = torch.bfloat16 if bits == "bf16" else torch.float32
    if old == "old":
        model = GPT(config, init_seed=1)
        for param in model.parameters():  # what DeepSpeed's module cast does, parameter by parameter
            param.data = param.data.to(dtype)
    else:
        model = build_gpt(config, init_seed=1, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "variant": args.variant,
        "params": model.num_parameters(),
        "weights_gb": weights / 1e9,
        "peak_gb": (peak - before) * 1024 / 1e9,
        "seconds": seconds,
    }


def meta_sizes(config_path: str, tp: int) -> dict:
    """Per-rank sizes of a config at tensor-parallel size `tp`, from a model built on meta: the
    old build's fp32 transient and the new one's (largest parameter, full, fp32)."""
    from pretrain.config import load_config
    from pretrain.models.gpt import GPT
    from pretrain.models.sharding import sharding
    from pretrain.parallel.tensor import TensorParallelLayers

    config = load_config(config_path, [f"parallel.tensor={tp}"]).model
    layers = TensorParallelLayers(types.SimpleNamespace(tp=tp, tp_rank=0, tp_group=None, sequence_parallel=True))
    with torch.device("meta"):
        model = GPT(config, layers=layers if tp > 1 else None, init_seed=1)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    largest_full = max(p.numel() * (tp if sharding(p).tp else 1) for p in params)
    return {
        "params_per_rank_b": n / 1e9,
        "fp32_gb": 4 * n / 1e9,
        "bf16_gb": 2 * n / 1e9,
        "largest_param_full_fp32_gb": 4 * largest_full / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--meta", metavar="CONFIG", help="report per-rank sizes of CONFIG (built on meta) and exit")
    p.add_argument("--tp", type=int, default=1)
    args = p.parse_args()
    if args.meta:
        sizes = meta_sizes(args.meta, args.tp)
        print(json.dumps(sizes))
        print(
            f"RESULT model_build_meta params_per_rank_b={sizes['params_per_rank_b']:.3f} "
            f"old_transient_fp32_gb={sizes['fp32_gb']:.2f} "
            f"new_transient_gb={sizes['largest_param_full_fp32_gb']:.2f} "
            f"ratio={sizes['fp32_gb'] / sizes['largest_param_full_fp32_gb']:.2f}"
        )
        return
    if args.variant:
        print(json.dumps(child(args)))
        return
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--layers",
                str(args.layers),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
        r = rows[variant]
        print(
            f"{variant:9s} params {r['params'] / 1e6:8.1f}M  final weights {r['weights_gb']:6.2f} GB  "
            f"peak {r['peak_gb']:6.2f} GB  {r['seconds']:6.1f} s",
            flush=True,
        )
    print(
        f"RESULT model_build params_m={rows['new_bf16']['params'] / 1e6:.1f} "
        + " ".join(f"{v}_peak_gb={rows[v]['peak_gb']:.2f}" for v in VARIANTS)
        + f" ratio={rows['old_bf16']['peak_gb'] / rows['new_bf16']['peak_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
