"""The Triton kernels compile for real GPUs without one: Triton's compiler and the ptxas bundled
in its wheel build each kernel for sm_90 (H100/H200) and sm_80 (A100) at the launch
configurations the wrappers pick for 1.3B-13B sizes, for every dtype, and cuobjdump's resource
report must show no register spills. Runs in a subprocess (`--worker compile`) so that this
process's TRITON_INTERPRET setting cannot leak in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ------------------------------------------------ compiling for real GPUs (no GPU needed)

# The interpreter checks what the kernels compute, not that they compile: Triton's compiler and
# the ptxas bundled in its wheel build them for a GPU target on this CPU machine. Each kernel is
# built at the launch configuration the wrappers pick for 1.3B-13B sizes, for every dtype, and
# cuobjdump's resource report must show no register spills (LOCAL/STACK bytes).
COMPILE_TARGETS = [("cuda", 90, 32), ("cuda", 80, 32)]  # H100/H200, A100
STAT_POINTERS = {"mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr", "max_ptr", "sums_ptr", "lse_ptr", "scale_ptr"}


def _compile_variants():
    """(label, jit function, {constexpr: value}, num_warps, data dtype, param dtype)."""
    from pretrain.models.kernels import triton_cross_entropy as ce
    from pretrain.models.kernels import triton_norms as norms
    from pretrain.models.kernels import triton_rope as rope
    from pretrain.models.kernels import triton_swiglu as sw
    from pretrain.models.kernels.triton_common import row_block, row_warps

    variants = []
    for dt in ("fp32", "bf16"):
        for hidden in (1024, 2048, 5120):  # 5120 (13B): an 8192 block
            block = row_block(hidden)
            for rms, has_b in ((True, False), (False, True)):
                const = dict(RMS=rms, HAS_W=True, HAS_B=has_b, BLOCK=block)
                for fn in (norms._norm_fwd, norms._norm_bwd):
                    variants.append((f"{fn.__name__} h{hidden} rms={rms}", fn, const, row_warps(block), dt, "fp32"))
        for fn in (sw._swiglu_fwd, sw._swiglu_bwd):
            variants.append((fn.__name__, fn, dict(BLOCK=sw.BLOCK_MAX), 4, dt, dt))
        for backward in (False, True):
            const = dict(BACKWARD=backward, BLOCK_S=rope.BLOCK_S, BLOCK_H=64)
            variants.append((f"_rope_kernel backward={backward}", rope._rope_kernel, const, 4, dt, dt))
        variants.append(("_ce_fwd", ce._ce_fwd, dict(BLOCK=ce.BLOCK_FWD), 8, dt, dt))
        variants.append(("_ce_bwd", ce._ce_bwd, dict(BLOCK=ce.BLOCK_BWD), 8, dt, dt))
    return variants


def _signature(fn, constexprs: dict, data: str, param: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name in STAT_POINTERS:
            sig[name] = "*fp32"
        elif name in ("w_ptr", "b_ptr"):
            sig[name] = f"*{param}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{data}"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_worker() -> int:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton
    except ImportError as e:
        print(f"triton is not importable ({e}): run tests/run.sh, which installs it", file=sys.stderr)
        return 3
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    reports = {}
    for target in COMPILE_TARGETS:
        for label, fn, const, warps, data, param in _compile_variants():
            key = f"sm{target[1]} {label} {data} warps={warps}"
            try:
                src = ASTSource(fn=fn, signature=_signature(fn, const, data, param), constexprs=const)
                kernel = triton.compile(src, target=GPUTarget(*target), options={"num_warps": warps})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run(
                        [str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True
                    ).stdout
                fields = dict(
                    tok.split(":", 1) for line in usage.splitlines() if "REG:" in line for tok in line.split()
                )
                reports[key] = {k: int(fields[k]) for k in ("REG", "STACK", "LOCAL", "SHARED")}
            except Exception as e:
                reports[key] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    print("RESULTS " + json.dumps(reports))
    return 0


def test_triton_compiles_for_gpus(worker_results):
    """Every kernel compiles for sm_90 and sm_80 at the wrappers' GPU launch configurations,
    without register spills."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PRETRAIN_KERNELS")}
    reports = worker_results(__file__, "compile", env, "compile worker")
    failed = {k: r["error"] for k, r in reports.items() if "error" in r}
    assert not failed, f"kernels that do not compile: {failed}"
    spills = {k: r for k, r in reports.items() if r["LOCAL"] or r["STACK"]}
    assert not spills, f"kernels that spill registers: {spills}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker", "compile"]:
        sys.exit(compile_worker())
    sys.exit(f"usage: {sys.argv[0]} --worker compile (pytest runs this file)")
