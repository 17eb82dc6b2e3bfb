"""One training step of our GPT against Hugging Face transformers, same shape, same process.

Measures forward + backward + AdamW step + zero_grad of
  - our GPT, llama flavour, vs `LlamaForCausalLM`, and
  - our GPT, gpt2 flavour,  vs `GPT2LMHeadModel`,
built with the same shape (same parameter count, checked), on the same batch, with the same
optimizer settings, on the same threads. Timed steps alternate ours / peer (A B A B ...) so that
machine noise lands on both equally. Reports the median step time, tokens/s, achieved model
TFLOP/s (`pretrain.metrics.training_flops` of the shape, the same count for both sides) and MFU
against a matmul peak measured in this run.

    python bench/train_step.py                        # both flavours, fp32, default shape
    python bench/train_step.py --flavour llama --precision bf16 --kv-heads 2

Last lines: `RESULT train_step_<flavour>_<precision>_h<hidden> tokens_per_s=... ratio=...`,
ratio = our tokens/s over the peer's (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pretrain.config import ModelConfig, config_from_dict
from pretrain.metrics import measure_peak_tflops, training_flops
from pretrain.models.gpt import GPT

DEFAULT_VOCAB = {"llama": 32000, "gpt2": 50257}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavour", choices=["llama", "gpt2", "both"], default="both")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: both models run under torch.autocast(bfloat16), fp32 weights",
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="llama only; default --heads")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences per step)")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary; default 32000 (llama) / 50257 (gpt2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument(
        "--optimizer",
        choices=["fused", "foreach", "for-loop"],
        default="fused",
        help="torch.optim.AdamW implementation, the same for both models",
    )
    p.add_argument(
        "--retain-memory",
        action="store_true",
        help="pin glibc malloc so freed memory is kept and reused (no mmap/munmap and "
        "page-fault churn for large tensors): compares compute alone",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--compile",
        action="store_true",
        help="ours with model.compile=true (torch.compile of each block); the peer stays eager",
    )
    p.add_argument(
        "--compile-peer", action="store_true", help="also torch.compile the peer's decoder layers (both compiled)"
    )
    return p.parse_args(argv)


def retain_memory() -> None:
    """glibc: serve every allocation from the heap and never trim it. By default tensors above a
    (moving) threshold are mmap-ed and unmapped on free, so each step faults its big buffers in
    again; that cost depends on each model's allocation pattern, and, in one process, on the
    other model's history too (the threshold moves)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--retain-memory: mallopt refused (not glibc?)")


def model_config(args: argparse.Namespace, flavour: str) -> ModelConfig:
    model = {
        "flavour": flavour,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "seq_length": args.seq,
        "vocab_size": args.vocab or DEFAULT_VOCAB[flavour],
        "dropout": 0.0,
        "compile": args.compile,
    }
    if flavour == "llama" and args.kv_heads:
        model["num_kv_heads"] = args.kv_heads
    return config_from_dict({"model": model, "train": {"micro_batch_size": args.batch}}).model


def build_peer(mc: ModelConfig) -> torch.nn.Module:
    """The transformers model of the same shape (vocabulary = our padded rows)."""
    if mc.flavour == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=mc.vocab_rows,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.ffn_size,
            num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads,
            num_key_value_heads=mc.kv_heads,
            head_dim=mc.head_dim,
            max_position_embeddings=mc.positions,
            rms_norm_eps=mc.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            use_cache=False,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    # activation_function stays GPT-2's own default ("gelu_new", the tanh GeLU we also use).
    cfg = GPT2Config(
        vocab_size=mc.vocab_rows,
        n_positions=mc.positions,
        n_embd=mc.hidden_size,
        n_layer=mc.num_layers,
        n_head=mc.num_heads,
        n_inner=mc.ffn_size,
        layer_norm_epsilon=mc.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def make_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kind)


def bench_flavour(args: argparse.Namespace, flavour: str, peak: float) -> dict:
    mc = model_config(args, flavour)
    torch.manual_seed(args.seed)
    ours = GPT(mc).train()
    peer = build_peer(mc).train()
    if args.compile_peer:
        layers = peer.model.layers if flavour == "llama" else peer.transformer.h
        for layer in layers:
            layer.compile()
    n_ours, n_peer = num_params(ours), num_params(peer)
    print(
        f"\n[{flavour}] hidden {mc.hidden_size}, layers {mc.num_layers}, heads {mc.num_heads}, "
        f"kv heads {mc.kv_heads}, ffn {mc.ffn_size}, vocab rows {mc.vocab_rows}, seq {args.seq}, "
        f"batch {args.batch}"
    )
    print(f"[{flavour}] parameters: ours {n_ours:,}  peer {n_peer:,}")
    if n_ours != n_peer:
        raise SystemExit(
            f"[{flavour}] parameter counts differ ({n_ours} vs {n_peer}): the shapes "
            "do not match, the comparison would not be fair"
        )

    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, mc.vocab_size, (args.batch, args.seq + 1), generator=g)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    )

    # Each side gets the same next-token objective, in its own idiom: ours takes shifted labels,
    # transformers takes labels == input_ids and shifts inside (with one ignored label per row,
    # so both compute cross-entropy over batch x seq fp32 logit rows).
    def ours_loss():
        return ours(inputs, labels=targets)

    def peer_loss():
        return peer(input_ids=inputs, labels=inputs).loss

    sides = {
        "ours": (ours, make_optimizer(ours, args.optimizer), ours_loss),
        "peer": (peer, make_optimizer(peer, args.optimizer), peer_loss),
    }

    def step(name: str) -> tuple[float, float]:
        model, opt, loss_fn = sides[name]
        start = time.perf_counter()
        with autocast():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    first = {}
    for _ in range(args.warmup):
        for name in sides:
            _, loss = step(name)
            first.setdefault(name, loss)
    times = {name: [] for name in sides}
    for _ in range(args.steps):
        for name in sides:  # A B A B ...
            t, loss = step(name)
            first.setdefault(name, loss)
            times[name].append(t)
    print(f"[{flavour}] first-step loss: ours {first['ours']:.4f}  peer {first['peer']:.4f}")
    for name, ts in times.items():
        print(f"[{flavour}] {name} step times (s): " + " ".join(f"{t:.3f}" for t in ts))

    flops = training_flops(mc, batch=args.batch, seq=args.seq)
    tokens = args.batch * args.seq
    out = {"flavour": flavour, "flops": flops, "params": n_ours}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "tokens_per_s": tokens / med,
            "tflops": flops / med / 1e12,
            "mfu": flops / med / 1e12 / peak,
        }
    out["ratio"] = out["ours"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.retain_memory:
        retain_memory()
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    import transformers

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_peak_tflops(device, dtype)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, precision {args.precision}, "
        f"AdamW {args.optimizer}, allocator {'retain (mallopt)' if args.retain_memory else 'default'}"
    )
    print(f"measured peak ({args.precision} matmul 2048^3): {peak * 1e3:.1f} GFLOP/s")
    # Other processes on the machine slow both sides alike (steps interleave) but blur figures.
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))

    flavours = ["llama", "gpt2"] if args.flavour == "both" else [args.flavour]
    results = [bench_flavour(args, f, peak) for f in flavours]

    print(f"\n{'model':<22}{'median s':>10}{'min s':>8}{'max s':>8}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}")
    for r in results:
        for name, label in (("ours", "pretrain GPT"), ("peer", "transformers")):
            m = r[name]
            print(
                f"{r['flavour'] + ' ' + label:<22}{m['median_s']:>10.3f}{m['min_s']:>8.3f}"
                f"{m['max_s']:>8.3f}{m['tokens_per_s']:>11.1f}{m['tflops']:>10.4f}"
                f"{m['mfu']:>8.1%}"
            )
        print(
            f"{r['flavour'] + ' ratio ours/peer':<22}{r['ratio']:>10.3f}   "
            f"(model GFLOP per step {r['flops'] / 1e9:.1f})"
        )
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    for r in results:
        o, p = r["ours"], r["peer"]
        print(
            f"RESULT train_step_{r['flavour']}_{args.precision}_h{args.hidden} "
            f"tokens_per_s={o['tokens_per_s']:.1f} peer_tokens_per_s={p['tokens_per_s']:.1f} "
            f"mfu={o['mfu']:.4f} peer_mfu={p['mfu']:.4f} ratio={r['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
