"""One training step of our GPT against Hugging Face transformers, same shape, same process.

Measures forward + backward + AdamW step + zero_grad of
  - our GPT, llama flavour, vs `LlamaForCausalLM`,
  - our GPT, gpt2 flavour,  vs `GPT2LMHeadModel`, and (`--flavour moe`)
  - our GPT, llama flavour with model.moe (top-k of --experts SwiGLU experts in every block, the
    load-balancing loss in the objective), vs `MixtralForCausalLM` of the same shape (its router
    loss on too), run with transformers' default experts kernel (grouped_mm where torch has it)
    and again with its Python loop over experts (experts_implementation="eager"),
built with the same shape (same parameter count, checked), on the same batch, with the same
optimizer settings, on the same threads. Timed steps alternate ours / peer (A B A B ...) so that
machine noise lands on both equally. Reports the median step time, tokens/s, achieved model
TFLOP/s (`pretrain.metrics.training_flops` of the shape, the same count for both sides) and MFU
against a matmul peak measured in this run.

    python bench/train_step.py                        # both flavours, fp32, default shape
    python bench/train_step.py --flavour llama --precision bf16 --kv-heads 2
    python bench/train_step.py --flavour moe --experts 8 --top-k 2

Last lines: `RESULT train_step_<flavour>_<precision>_h<hidden> tokens_per_s=... ratio=...`,
ratio = our tokens/s over the peer's (> 1: we are faster); the MoE line adds
peer_eager_tokens_per_s and ratio_eager (against transformers' loop over experts).
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

DEFAULT_VOCAB = {"llama": 32000, "gpt2": 50257, "moe": 32000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavour", choices=["llama", "gpt2", "moe", "both"], default="both", help="both: llama and gpt2")
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
    p.add_argument(
        "--vocab", type=int, default=None, help="tokenizer vocabulary; default 32000 (llama, moe) / 50257 (gpt2)"
    )
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
    p.add_argument("--experts", type=int, default=8, help="moe: experts per block")
    p.add_argument("--top-k", type=int, default=2, help="moe: experts per token")
    p.add_argument(
        "--expert-ffn", type=int, default=None, help="moe: each expert's SwiGLU width; default the llama ffn"
    )
    p.add_argument(
        "--grouped-mm",
        choices=["auto", "on", "off"],
        default="auto",
        help="moe: our model.moe.grouped_mm (auto: the grouped matmul on GPUs, a loop over experts on CPUs)",
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
        "flavour": "llama" if flavour == "moe" else flavour,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "seq_length": args.seq,
        "vocab_size": args.vocab or DEFAULT_VOCAB[flavour],
        "dropout": 0.0,
        "compile": args.compile,
    }
    if flavour != "gpt2" and args.kv_heads:
        model["num_kv_heads"] = args.kv_heads
    if flavour == "moe":
        model["moe"] = {
            "num_experts": args.experts,
            "top_k": args.top_k,
            "ffn_hidden_size": args.expert_ffn,
            "aux_loss_coeff": 0.01,
            "grouped_mm": {"auto": None, "on": True, "off": False}[args.grouped_mm],
        }
    return config_from_dict({"model": model, "train": {"micro_batch_size": args.batch}}).model


def _llama_shape(mc: ModelConfig) -> dict:
    """The transformers config fields Llama and Mixtral share, at our model's shape."""
    return dict(
        vocab_size=mc.vocab_rows,
        hidden_size=mc.hidden_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.kv_heads,
        head_dim=mc.head_dim,
        max_position_embeddings=mc.positions,
        rms_norm_eps=mc.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_peer(mc: ModelConfig) -> torch.nn.Module:
    """The transformers model of the same shape (vocabulary = our padded rows)."""
    if mc.moe is not None:  # Mixtral, its router loss (router_aux_loss_coef) on as ours is
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(
            **_llama_shape(mc),
            intermediate_size=mc.moe.expert_ffn(mc),
            num_local_experts=mc.moe.num_experts,
            num_experts_per_tok=mc.moe.top_k,
            output_router_logits=True,
            router_aux_loss_coef=0.01,
        )
        return MixtralForCausalLM(cfg)
    if mc.flavour == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**_llama_shape(mc), intermediate_size=mc.ffn_size, attention_bias=False, mlp_bias=False)
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


def build_models(args: argparse.Namespace, flavour: str, mc: ModelConfig) -> dict[str, torch.nn.Module]:
    """ours, peer (and for moe peer_eager: Mixtral with its Python loop over experts), built
    with the same parameter count (checked)."""
    torch.manual_seed(args.seed)
    models = {"ours": GPT(mc).train(), "peer": build_peer(mc).train()}
    if mc.moe is not None:
        models["peer_eager"] = build_peer(mc).train()
        models["peer_eager"].set_experts_implementation("eager")
        kernel = models["peer"].config._experts_implementation
        print(f"[{flavour}] transformers experts kernel: peer {kernel}, peer_eager eager")
    if args.compile_peer:
        for name, peer in models.items():
            if name != "ours":
                for layer in peer.model.layers if flavour != "gpt2" else peer.transformer.h:
                    layer.compile()
    print(
        f"\n[{flavour}] hidden {mc.hidden_size}, layers {mc.num_layers}, heads {mc.num_heads}, "
        f"kv heads {mc.kv_heads}, ffn {mc.ffn_size}, vocab rows {mc.vocab_rows}, seq {args.seq}, "
        f"batch {args.batch}"
        + (f", {mc.moe.num_experts} experts of ffn {mc.moe.expert_ffn(mc)}, top-{mc.moe.top_k}" if mc.moe else "")
    )
    counts = {name: num_params(m) for name, m in models.items()}
    print(f"[{flavour}] parameters: " + "  ".join(f"{name} {n:,}" for name, n in counts.items()))
    if len(set(counts.values())) > 1:
        raise SystemExit(
            f"[{flavour}] parameter counts differ ({counts}): the shapes do not match, the comparison would not be fair"
        )
    return models


def time_steps(args: argparse.Namespace, models: dict[str, torch.nn.Module], mc: ModelConfig):
    """Warm-up, then timed steps alternating between the models (A B A B ...); returns each
    one's first loss and step times."""
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, mc.vocab_size, (args.batch, args.seq + 1), generator=g)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    )

    # Each side gets the same next-token objective, in its own idiom: ours takes shifted labels,
    # transformers takes labels == input_ids and shifts inside (with one ignored label per row,
    # so both compute cross-entropy over batch x seq fp32 logit rows). With MoE both add their
    # router's load-balancing loss (ours through the backward, Mixtral's to its returned loss).
    def loss_of(name: str, model):
        return model(inputs, labels=targets) if name == "ours" else model(input_ids=inputs, labels=inputs).loss

    optimizers = {name: make_optimizer(model, args.optimizer) for name, model in models.items()}

    def step(name: str) -> tuple[float, float]:
        start = time.perf_counter()
        with autocast():
            loss = loss_of(name, models[name])
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    first, times = {}, {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name in models:
            t, loss = step(name)
            first.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(t)
    return first, times


def bench_flavour(args: argparse.Namespace, flavour: str, peak: float) -> dict:
    mc = model_config(args, flavour)
    models = build_models(args, flavour, mc)
    first, times = time_steps(args, models, mc)
    print(f"[{flavour}] first-step loss: " + "  ".join(f"{name} {loss:.4f}" for name, loss in first.items()))
    for name, ts in times.items():
        print(f"[{flavour}] {name} step times (s): " + " ".join(f"{t:.3f}" for t in ts))

    flops = training_flops(mc, batch=args.batch, seq=args.seq)
    tokens = args.batch * args.seq
    out = {"flavour": flavour, "flops": flops, "params": num_params(models["ours"]), "sides": list(times)}
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
    if "peer_eager" in out:
        out["ratio_eager"] = out["ours"]["tokens_per_s"] / out["peer_eager"]["tokens_per_s"]
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

    print(f"\n{'model':<26}{'median s':>10}{'min s':>8}{'max s':>8}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}")
    labels = {"ours": "pretrain GPT", "peer": "transformers", "peer_eager": "transformers eager"}
    for r in results:
        for name in r["sides"]:
            m = r[name]
            print(
                f"{r['flavour'] + ' ' + labels[name]:<26}{m['median_s']:>10.3f}{m['min_s']:>8.3f}"
                f"{m['max_s']:>8.3f}{m['tokens_per_s']:>11.1f}{m['tflops']:>10.4f}"
                f"{m['mfu']:>8.1%}"
            )
        print(
            f"{r['flavour'] + ' ratio ours/peer':<26}{r['ratio']:>10.3f}   "
            f"(model GFLOP per step {r['flops'] / 1e9:.1f})"
        )
        if "ratio_eager" in r:
            print(f"{r['flavour'] + ' ratio ours/peer eager':<26}{r['ratio_eager']:>10.3f}")
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    for r in results:
        o, p = r["ours"], r["peer"]
        line = (
            f"RESULT train_step_{r['flavour']}_{args.precision}_h{args.hidden} "
            f"tokens_per_s={o['tokens_per_s']:.1f} peer_tokens_per_s={p['tokens_per_s']:.1f} "
            f"mfu={o['mfu']:.4f} peer_mfu={p['mfu']:.4f}"
        )
        if "ratio_eager" in r:
            line += f" peer_eager_tokens_per_s={r['peer_eager']['tokens_per_s']:.1f} ratio_eager={r['ratio_eager']:.3f}"
        print(f"{line} ratio={r['ratio']:.3f}")


if __name__ == "__main__":
    main()
