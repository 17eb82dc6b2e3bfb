"""Fused kernels (pretrain/models/kernels) against float64 truth, forward and backward.

- The PyTorch references run here, in the pytest process, against F.rms_norm, F.layer_norm,
  F.silu, rotate-half RoPE (`_rope_truth`) and F.cross_entropy evaluated in float64.
- The Triton kernels run in one subprocess (`python tests/test_kernels.py --worker triton`)
  under TRITON_INTERPRET=1 + PRETRAIN_KERNELS=triton, which must be set before triton is
  imported; there every torch.empty is filled with NaN first (an element a kernel fails to
  write shows up as NaN), the references are made to raise (so dispatch really went to Triton),
  and each output is compared with float64 truth and with the reference.
- Vocab-parallel cross-entropy runs on 2 real gloo ranks (torch.multiprocessing spawn), with
  padding columns and a rank holding only padding, for both versions.
- tests/test_kernels_compile.py compiles every kernel for sm_90 and sm_80 (no GPU needed).
- On a GPU machine, `python tests/test_kernels.py --worker cuda` runs the same cases with the
  compiled kernels (not part of the pytest run, which has no GPU).

Inputs are fresh random draws each run (the seed is printed on failure). Tolerances are
‖out − truth‖ / ‖truth‖ (METHOD.md): fp32 < 1e-5, bf16 < 1e-2.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = "cpu"  # the --worker cuda mode runs the cases on a GPU, compiled
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    out, truth = out.detach().double(), truth.detach().double()
    if out.shape != truth.shape:
        return float("inf")
    if not torch.isfinite(out).all():
        return float("nan")
    denom = truth.norm()
    return float((out - truth).norm() / (denom if denom > 0 else 1.0))


def _randn(shape, gen, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [i for i in inputs if i is not None], grad_out)


# Each case runs `api` (the reference module, or the public kernels module in the Triton worker)
# on inputs drawn from `seed` and returns {metric: (value, float64 truth)}.


def case_rms_norm(api, dtype, seed):
    results = {}
    # (shape, weight dtype or None): odd widths, leading dims, the autocast mix (fp32 weight).
    for i, (shape, wdt) in enumerate(
        [((4, 8, 96), dtype), ((37, 127), dtype), ((2, 3, 130), torch.float32), ((16, 72), None)]
    ):
        gen = torch.Generator().manual_seed(seed + i)
        n = shape[-1]
        x = _randn(shape, gen, dtype)
        w = None if wdt is None else (1 + 0.5 * torch.randn(n, generator=gen)).to(DEVICE, wdt)
        dy = _randn(shape, gen, dtype)
        eps = 1e-6 if i % 2 else None  # None: finfo(dtype).eps, as F.rms_norm
        xs, ws = x.clone().requires_grad_(), None if w is None else w.clone().requires_grad_()
        y = api.rms_norm(xs, ws, eps)
        grads = _grads(y, [xs, ws], dy)
        xd, wd = x.double().requires_grad_(), None if w is None else w.double().requires_grad_()
        yd = F.rms_norm(xd, (n,), wd, torch.finfo(dtype).eps if eps is None else eps)
        truth = _grads(yd, [xd, wd], dy.double())
        results[f"{shape} y"] = (y, yd)
        results[f"{shape} dx"] = (grads[0], truth[0])
        if w is not None:
            results[f"{shape} dw"] = (grads[1], truth[1])
    return results


def case_layer_norm(api, dtype, seed):
    results = {}
    for i, (shape, wdt, has_bias) in enumerate(
        [
            ((4, 8, 96), dtype, True),
            ((37, 127), dtype, True),
            ((2, 3, 130), torch.float32, True),
            ((16, 72), dtype, False),
        ]
    ):
        gen = torch.Generator().manual_seed(seed + i)
        n = shape[-1]
        x = (3 + 2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)  # a mean far from 0
        w = (1 + 0.5 * torch.randn(n, generator=gen)).to(DEVICE, wdt)
        b = torch.randn(n, generator=gen).to(DEVICE, wdt) if has_bias else None
        dy = _randn(shape, gen, dtype)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        y = api.layer_norm(xs, ws, bs, 1e-5)
        grads = _grads(y, [xs, ws, bs], dy)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        bd = None if b is None else b.double().requires_grad_()
        yd = F.layer_norm(xd, (n,), wd, bd, 1e-5)
        truth = _grads(yd, [xd, wd, bd], dy.double())
        results[f"{shape} y"] = (y, yd)
        for name, g, t in zip(["dx", "dw", "db"], grads, truth):
            results[f"{shape} {name}"] = (g, t)
    return results


def case_swiglu(api, dtype, seed):
    results = {}
    for i, shape in enumerate([(4, 8, 2 * 96), (37, 2 * 127), (2, 3, 2 * 130), (5, 2 * 1100)]):
        gen = torch.Generator().manual_seed(seed + i)
        h = (2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
        dy = _randn(shape[:-1] + (shape[-1] // 2,), gen, dtype)
        hs = h.clone().requires_grad_()
        y = api.swiglu(hs)
        (dh,) = _grads(y, [hs], dy)
        hd = h.double().requires_grad_()
        gate, up = hd.chunk(2, dim=-1)
        yd = F.silu(gate) * up
        (truth,) = _grads(yd, [hd], dy.double())
        results[f"{shape} y"] = (y, yd)
        results[f"{shape} dh"] = (dh, truth)
    return results


def _qkv_views(qkv: torch.Tensor, kv: int, group: int, d: int):
    """q [b, kv*group, s, d], k, v [b, kv, s, d] as non-contiguous views of a fused
    qkv [b, s, kv * (group + 2) * d] (narrow, not split: split's views refuse in-place ops)."""
    b, s, _ = qkv.shape
    x = qkv.view(b, s, kv, group + 2, d)
    q = x.narrow(3, 0, group)
    q = q.reshape(b, s, kv * group, d).transpose(1, 2)  # a view only when group == 1
    k = x.narrow(3, group, 1).squeeze(3).transpose(1, 2)
    v = x.narrow(3, group + 1, 1).squeeze(3).transpose(1, 2)
    return q, k, v


def _rope_truth(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE written out (GPT-NeoX / HF Llama): x [b, heads, s, d], cos/sin [s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def case_rope(api, dtype, seed, *, inplace: bool):
    from pretrain.models.gpt import rope_tables

    results = {}
    # (b, kv_heads, group, s, d): d/2 = 12 is not a power of 2; s = 33 is not a block multiple.
    for i, (b, kv, group, s, d) in enumerate([(2, 2, 2, 33, 16), (1, 3, 1, 20, 24), (2, 1, 4, 9, 32)]):
        gen = torch.Generator().manual_seed(seed + i)
        cos, sin = rope_tables(positions=s + 7, head_dim=d, theta=10000.0)
        cos, sin = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)  # as the model's buffers after .to(dtype)
        qkv = _randn((b, s, kv * (group + 2) * d), gen, dtype)
        dq = _randn((b, kv * group, s, d), gen, dtype)
        dk = _randn((b, kv, s, d), gen, dtype)
        leaf = qkv.clone().requires_grad_()
        base = leaf * 1  # not a leaf: in-place on its views is allowed
        q, k, v = _qkv_views(base, kv, group, d)
        v_before = v.detach().clone()
        fn = api.apply_rope_ if inplace else api.apply_rope
        q_out, k_out = fn(q, k, cos, sin)
        if inplace:
            assert q_out is q and k_out is k, "apply_rope_ must return its own q, k"
            assert torch.equal(v.detach(), v_before), "apply_rope_ wrote outside q and k"
        (dqkv,) = torch.autograd.grad([q_out, k_out], [leaf], [dq, dk])
        cd, sd = cos[:s].double(), sin[:s].double()
        leaf_d = qkv.double().requires_grad_()
        qd, kd, _ = _qkv_views(leaf_d, kv, group, d)
        qr, kr = _rope_truth(qd, cd, sd), _rope_truth(kd, cd, sd)
        (truth,) = torch.autograd.grad([qr, kr], [leaf_d], [dq.double(), dk.double()])
        key = (b, kv, group, s, d)
        results[f"{key} q"] = (q_out, qr)
        results[f"{key} k"] = (k_out, kr)
        results[f"{key} dqkv"] = (dqkv, truth)
    return results


def _ce_truth(logits: torch.Tensor, labels: torch.Tensor, vocab_size, grad: torch.Tensor):
    """float64 F.cross_entropy over the first vocab_size columns; its logits gradient, zero on
    padding columns."""
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    ld = logits.double().requires_grad_()
    loss = F.cross_entropy(ld[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none", ignore_index=-100)
    (dl,) = torch.autograd.grad(loss, [ld], grad.double().reshape(-1))
    return loss.view(labels.shape), dl


def _labels(shape, vocab: int, gen) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=gen).to(DEVICE)
    labels.view(-1)[::7] = -100
    return labels


def case_cross_entropy(api, dtype, seed):
    results = {}
    # (logits shape, vocab_size, inplace_backward)
    for i, (shape, vocab_size, inplace) in enumerate(
        [((48, 250), None, False), ((2, 20, 257), 250, False), ((40, 257), 250, True), ((8, 5000), 4999, False)]
    ):
        gen = torch.Generator().manual_seed(seed + i)
        logits = 3 * torch.randn(shape, generator=gen)
        logits.view(-1, shape[-1])[0] += 300  # a row whose exp overflows without the max shift
        logits = logits.to(DEVICE, dtype)
        # labels as a strided view (every other column of a wider tensor), as model labels can be
        labels = _labels(shape[:-2] + (shape[-2], 2), vocab_size or shape[-1], gen)[..., 0]
        grad = (torch.rand(shape[:-1], generator=gen) + 0.5).to(DEVICE)
        ls = logits.clone().requires_grad_()
        x = ls * 1  # a non-leaf buffer, as the model's F.linear output
        loss = api.cross_entropy(x, labels, vocab_size=vocab_size, inplace_backward=inplace)
        assert loss.dtype == torch.float32 and loss.shape == labels.shape, (loss.dtype, loss.shape)
        (dl,) = torch.autograd.grad(loss, [ls], grad, retain_graph=inplace)
        if inplace and getattr(api, "__name__", "") == "pretrain.models.kernels":  # the reference has none
            try:
                torch.autograd.grad(loss, [ls], grad)
                raise AssertionError("a second in-place backward must raise (the logits are gone)")
            except RuntimeError as e:
                assert "runs backward once" in str(e), e
        if vocab_size is not None:
            assert not dl[..., vocab_size:].count_nonzero(), "padding columns got a gradient"
        assert (loss[labels == -100] == 0).all(), "ignored labels must give loss 0"
        truth, dtruth = _ce_truth(logits, labels, vocab_size, grad)
        results[f"{shape} v{vocab_size} loss"] = (loss, truth)
        results[f"{shape} v{vocab_size} dlogits"] = (dl, dtruth)
    return results


CASES = {
    "rms_norm": case_rms_norm,
    "layer_norm": case_layer_norm,
    "swiglu": case_swiglu,
    "rope": lambda api, dtype, seed: case_rope(api, dtype, seed, inplace=False),
    "rope_inplace": lambda api, dtype, seed: case_rope(api, dtype, seed, inplace=True),
    "cross_entropy": case_cross_entropy,
}


def run_case(name: str, dtype_name: str, api, ref_api=None, seed=None) -> dict:
    """{"seed", "errors": {metric: err vs truth}, "vs_ref": {metric: err vs reference}} or {"error"}."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    dtype = DTYPES[dtype_name]
    try:
        results = CASES[name](api, dtype, seed)
        report = {"seed": seed, "errors": {m: rel_err(v, t) for m, (v, t) in results.items()}}
        if ref_api is not None:
            ref = CASES[name](ref_api, dtype, seed)
            report["vs_ref"] = {m: rel_err(v, ref[m][0]) for m, (v, _) in results.items()}
        return report
    except Exception as e:  # reported per case, so one failure does not hide the others
        import traceback

        return {"seed": seed, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}


def assert_report(report: dict, dtype_name: str, what: str) -> None:
    assert "error" not in report, f"{what} (seed {report['seed']}): {report['error']}"
    tol = TOL[DTYPES[dtype_name]]
    for key in ("errors", "vs_ref"):
        bad = {m: e for m, e in report.get(key, {}).items() if not e < tol}
        assert not bad, f"{what} {key} over {tol} (seed {report['seed']}): {bad}"


# Vocab-parallel cross-entropy on 2 gloo ranks.

TP_CASES = [  # (N, V_local per rank, vocab_size): padding on rank 1; rank 1 all padding
    (24, 257, 500),
    (24, 250, 500),
    (16, 257, 250),
]


def _tp_rank(seed: int, dtype_name: str) -> dict:
    """One rank of run_tp (parallel_harness.run_ranks has set up the gloo group's environment):
    {case: (loss, gradient of this rank's logits shard)}."""
    import torch.distributed as dist

    from pretrain.models import kernels

    if os.environ.get("PRETRAIN_KERNELS") == "triton":
        _forbid_reference()
        _poison_empty()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for i, (n, local_vocab, vocab_size) in enumerate(TP_CASES):
        full, labels, grad = _tp_inputs(i, n, local_vocab * world, vocab_size, seed, DTYPES[dtype_name])
        shard = full[:, rank * local_vocab : (rank + 1) * local_vocab].clone().requires_grad_()
        loss = kernels.cross_entropy(
            shard * 1, labels, vocab_start=rank * local_vocab, vocab_size=vocab_size, group=dist.group.WORLD
        )
        (dshard,) = torch.autograd.grad(loss, [shard], grad)
        out[i] = (loss, dshard)
    return out


def _tp_inputs(i, n, padded_vocab, vocab_size, seed, dtype):
    gen = torch.Generator().manual_seed(seed + i)
    full = (3 * torch.randn(n, padded_vocab, generator=gen)).to(dtype)
    labels = _labels((n,), vocab_size, gen)
    grad = torch.rand(n, generator=gen) + 0.5
    return full, labels, grad


def run_tp(dtype_name: str, seed=None) -> dict:
    """Both ranks' losses must equal the single-rank float64 truth, and the concatenated
    gradient shards its gradient (zero on padding)."""
    from tests.parallel_harness import run_ranks

    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    world = 2
    try:
        ranks = run_ranks(world, _tp_rank, seed, dtype_name)
        errors = {}
        for i, (n, local_vocab, vocab_size) in enumerate(TP_CASES):
            full, labels, grad = _tp_inputs(i, n, local_vocab * world, vocab_size, seed, DTYPES[dtype_name])
            truth, dtruth = _ce_truth(full, labels, vocab_size, grad)
            key = f"N{n} V{local_vocab}x{world} v{vocab_size}"
            for r in range(world):
                errors[f"{key} loss rank{r}"] = rel_err(ranks[r][i][0], truth)
            dl = torch.cat([ranks[r][i][1] for r in range(world)], dim=1)
            errors[f"{key} dlogits"] = rel_err(dl, dtruth)
            if dl[:, vocab_size:].count_nonzero():
                errors[f"{key} padding grad"] = float("inf")
        return {"seed": seed, "errors": errors}
    except Exception as e:
        import traceback

        return {"seed": seed, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}


# ---------------------------------------------------------------- the Triton worker (subprocess)


def _poison_empty() -> None:
    """Every torch.empty comes back NaN-filled (max int for integers): an output element a kernel
    does not write then fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    torch.empty = empty


def _forbid_reference():
    """Make the public API's reference fallbacks raise; returns an object holding the originals."""
    import types

    from pretrain.models.kernels import reference

    names = ["rms_norm", "layer_norm", "swiglu", "apply_rope", "apply_rope_", "cross_entropy"]
    originals = types.SimpleNamespace(**{n: getattr(reference, n) for n in names})

    def forbidden(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"PRETRAIN_KERNELS=triton but kernels.{name} ran the PyTorch reference")

        return fn

    for n in names:
        setattr(reference, n, forbidden(n))
    return originals


def triton_worker() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["PRETRAIN_KERNELS"] = "triton"
    if "triton" in sys.modules:
        print("triton was imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"triton is not importable ({e}): run tests/run.sh, which installs it", file=sys.stderr)
        return 3
    from pretrain.models import kernels

    ref_api = _forbid_reference()
    _poison_empty()
    reports = {}
    for name in [*CASES, "tp"]:
        for dt in DTYPES:
            # A kernel that writes out of bounds can crash the interpreter: say which case ran.
            print(f"running {name} {dt}", file=sys.stderr, flush=True)
            reports[f"{name}-{dt}"] = run_tp(dt) if name == "tp" else run_case(name, dt, kernels, ref_api)
    print("running the model", file=sys.stderr, flush=True)
    reports["model"] = model_with_kernels(ref_api)
    print("RESULTS " + json.dumps(reports))
    return 0


def model_with_kernels(ref_api) -> dict:
    """A tiny GPT of each flavour (llama: GQA, padded vocabulary) through every wired-in kernel
    (norms, SwiGLU, RoPE, the fused loss) against the model's torch path (PRETRAIN_KERNELS=torch:
    the references, `ref_api` put back for that run): the worst relative error over the loss and
    every parameter's gradient."""
    from pretrain.config import config_from_dict
    from pretrain.models.gpt import GPT
    from pretrain.models.kernels import reference

    forbidden = {n: getattr(reference, n) for n in vars(ref_api)}

    errors = {}
    for flavour, extra in (("llama", {"num_kv_heads": 1}), ("gpt2", {})):
        config = config_from_dict(
            {
                "model": {
                    "flavour": flavour,
                    "num_layers": 1,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "vocab_size": 50,
                    "seq_length": 8,
                    **extra,
                }
            }
        ).model
        tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        results = {}
        for mode in ("torch", "triton"):
            os.environ["PRETRAIN_KERNELS"] = mode
            for n, fn in (vars(ref_api) if mode == "torch" else forbidden).items():
                setattr(reference, n, fn)
            model = GPT(config, init_seed=0)
            loss = model(tokens, labels=tokens.roll(-1, 1))
            loss.backward()
            results[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
        errors[flavour] = max(rel_err(a, b) for a, b in zip(results["triton"], results["torch"]))
    os.environ["PRETRAIN_KERNELS"] = "triton"
    return errors


def cuda_worker() -> int:
    """On a GPU machine: `python tests/test_kernels.py --worker cuda` runs every case with the
    compiled Triton kernels (PRETRAIN_KERNELS unset: CUDA tensors dispatch to Triton), prints a
    table and exits 1 if any error is over its tolerance."""
    global DEVICE
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    DEVICE = "cuda"
    os.environ.pop("PRETRAIN_KERNELS", None)
    os.environ.pop("TRITON_INTERPRET", None)
    from pretrain.models import kernels

    ref_api = _forbid_reference()
    _poison_empty()
    failed = 0
    for name in CASES:
        for dt in DTYPES:
            report = run_case(name, dt, kernels, ref_api)
            torch.cuda.synchronize()
            if "error" in report:
                print(f"{name} {dt}: ERROR {report['error']}")
                failed += 1
                continue
            worst = max(report["errors"].values())
            worst_ref = max(report["vs_ref"].values())
            ok = worst < TOL[DTYPES[dt]] and worst_ref < TOL[DTYPES[dt]]
            failed += not ok
            print(
                f"{name:14s} {dt}  max err vs float64 {worst:.2e}  vs reference {worst_ref:.2e}  "
                f"{'ok' if ok else 'FAIL'}  (seed {report['seed']})"
            )
    print(f"{torch.cuda.get_device_name()}: {'all ok' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


@pytest.fixture(scope="module")
def triton_reports(worker_results) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PRETRAIN_KERNELS="triton")
    return worker_results(__file__, "triton", env, "Triton worker")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_reference(name, dtype_name):
    """The PyTorch references equal F.* / rotate-half RoPE in float64."""
    from pretrain.models.kernels import reference

    assert_report(run_case(name, dtype_name, reference), dtype_name, f"reference {name} {dtype_name}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_triton(triton_reports, name, dtype_name):
    """The Triton kernels (interpreted) equal float64 truth and the references."""
    assert_report(triton_reports[f"{name}-{dtype_name}"], dtype_name, f"triton {name} {dtype_name}")


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_model_runs_the_kernels_like_its_torch_path(triton_reports, flavour):
    """Wired into the GPT (layers.py norms and losses, gpt.py SwiGLU and RoPE): same loss and
    gradients, fp32, as its torch path (the references)."""
    assert triton_reports["model"][flavour] < 1e-5, triton_reports["model"]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_triton_vocab_parallel_cross_entropy(triton_reports, dtype_name):
    assert_report(triton_reports[f"tp-{dtype_name}"], dtype_name, f"triton 2-rank cross-entropy {dtype_name}")


def test_reference_vocab_parallel_cross_entropy(worker_results):
    """2 gloo ranks, reference version (fp32; bf16 runs in the Triton worker's pair)."""
    env = dict(os.environ, PRETRAIN_KERNELS="torch")
    report = worker_results(__file__, "tp-torch", env, "worker")
    assert_report(report, "fp32", "reference 2-rank cross-entropy")


def test_dispatch(monkeypatch):
    from pretrain.models import kernels

    x = torch.randn(2, 3)
    monkeypatch.setenv("PRETRAIN_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("PRETRAIN_KERNELS", "auto")
    assert not kernels.use_triton(x)  # CPU tensors use the reference unless forced
    monkeypatch.setenv("PRETRAIN_KERNELS", "fast")
    with pytest.raises(ValueError, match="PRETRAIN_KERNELS"):
        kernels.use_triton(x)


if __name__ == "__main__":
    mode = sys.argv[sys.argv.index("--worker") + 1] if "--worker" in sys.argv else None
    if mode == "triton":
        sys.exit(triton_worker())
    if mode == "cuda":
        sys.exit(cuda_worker())
    if mode == "tp-torch":
        os.environ["PRETRAIN_KERNELS"] = "torch"
        print("RESULTS " + json.dumps(run_tp("fp32")))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} --worker triton|cuda|tp-torch (pytest runs this file)")
