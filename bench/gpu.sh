#!/usr/bin/env bash
# The GPU checks of the kernels issue in one prepared call on a lent GPU machine (one H200):
#   1. the Triton kernels, compiled for the GPU, against their references (fwd + bwd, fp32/bf16,
#      odd sizes): tests/test_kernels.py --worker cuda;
#   2. a tiny GPT through the kernels against its torch path, on the GPU;
#   3. per-kernel time: PyTorch eager vs torch.compile vs Triton at 1.3B sizes (bench/kernels.py);
#   3b. context parallelism's kernel path: the ring's blocks (CP 4 played on one GPU) through each
#      block kernel (math, torch's flash / memory-efficient, flash-attn's when installed; fp32 and
#      bf16, causal and documents), merged by log-sum-exp, against SDPA over the whole sequence,
#      forward and backward; then fused against math per block (bench/gpu_context.py);
#   4. gpt_1.3b, sequence 2048, bf16, one GPU, 30 steps eager and with model.compile: tokens/s and
#      MFU against the GPU's datasheet dense bf16 peak (pretrain/hardware.py) and against a bf16
#      matmul rate measured in the same process (bench/gpu_train.py);
# then a short table last. Uses the machine's own python3/torch/triton (nothing is installed);
# full logs go to $OUT (the device tool brings that folder back) or ./gpu-out.
#
#   run: bash bench/gpu.sh          (budget: ~8 of the 15 device minutes; each part is bounded)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $((SECONDS - start))s")
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"

part kernels_check 150 "$PY" tests/test_kernels.py --worker cuda
part model_check 90 "$PY" - <<'PYEOF'
import torch
from pretrain.config import config_from_dict
from pretrain.models.gpt import GPT
import os
for flavour, extra in (("llama", {"num_kv_heads": 2}), ("gpt2", {})):
    cfg = config_from_dict({"model": {"flavour": flavour, "num_layers": 2, "hidden_size": 256, "num_heads": 4,
                                      "vocab_size": 1001, "seq_length": 128, **extra}}).model
    tokens = torch.randint(0, 1001, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = {}
    for mode in ("torch", "triton"):
        os.environ["PRETRAIN_KERNELS"] = mode
        with torch.device("cuda"):
            model = GPT(cfg, init_seed=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens.roll(-1, 1))
        loss.backward()
        out[mode] = [loss.detach().float()] + [p.grad.float() for p in model.parameters()]
    err = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(out["triton"], out["torch"]))
    print(f"RESULT model_kernels_{flavour}_bf16 max_rel_err={err:.2e} ok={err < 2e-2}")
PYEOF
part context_kernel 120 "$PY" bench/gpu_context.py --device cuda --seq 8192 --cp 4 --speed
part kernels_bench 180 "$PY" bench/kernels.py --device cuda
part train_1.3b 300 "$PY" bench/gpu_train.py --config configs/gpt_1.3b.yaml --seq 2048 --micro-batch 8 \
    --accumulation 2 --steps 30 --warmup 10 --variants eager,compile

echo
echo "== summary"
printf '%s\n' "${status[@]}"
grep -h "^RESULT" "$OUT"/*.log | tee "$OUT/results.txt"
