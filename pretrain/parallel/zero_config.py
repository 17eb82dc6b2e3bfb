"""The DeepSpeed config generated from ours, and what we refuse before DeepSpeed sees a run.

DeepSpeed's engine is built from a config we generate (`deepspeed_config`), so a user never
writes a second config that could disagree with ours. A ZeRO run without DeepSpeed, or with a
precision DeepSpeed does not support on this device, fails before any process group starts
(`require_deepspeed`).

Nothing here imports DeepSpeed at module level, so the rest of the framework runs without it.
"""

from __future__ import annotations

import importlib.util
import math

from pretrain.config import ConfigError, RunConfig
from pretrain.optim import LOSS_SCALE_HYSTERESIS, LOSS_SCALE_INIT_POWER, LOSS_SCALE_MIN, LOSS_SCALE_WINDOW

INSTALL_HINT = "pip install -c constraints.txt -e '.[zero]' (with DS_BUILD_OPS=0 in the environment)"


def require_deepspeed(config: RunConfig) -> None:
    """Fail before any process group when a ZeRO run lacks DeepSpeed, or DeepSpeed refuses its
    precision on this device. Not part of the config's validation (ParallelConfig.validate):
    reading a ZeRO checkpoint's config (load_model) must not need DeepSpeed."""
    if not config.parallel.zero_stage:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallel.zero_stage={config.parallel.zero_stage} needs DeepSpeed, which is not installed: {INSTALL_HINT}"
        )
    check_precision_supported(config.train.precision)


def check_precision_supported(precision: str) -> None:
    """Refuse a precision DeepSpeed's accelerator does not support on this device."""
    from deepspeed.accelerator import get_accelerator  # lazy: only ZeRO runs need DeepSpeed

    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"train.precision: DeepSpeed does not support fp16 on this device "
            f"({accelerator.device_name()}; on a CPU it needs fp16 matmul support, e.g. "
            "AVX512-FP16 or AMX-FP16); use train.precision=bf16, or fp16 without ZeRO "
            "(parallel.zero_stage=0)"
        )
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(
            f"train.precision: DeepSpeed does not support bf16 on this device "
            f"({accelerator.device_name()}); use train.precision=fp16 or fp32"
        )


def deepspeed_config(config: RunConfig, *, data_parallel: int, accumulation: int) -> dict:
    """The DeepSpeed config equivalent to our run config (printed at start, saved nowhere else).
    `data_parallel`: the size of the group DeepSpeed reduces over (data x context ranks)."""
    p, t, o = config.parallel, config.train, config.optimizer
    element_bytes = 4 if t.precision == "fp32" else 2
    # DeepSpeed counts elements, and wants a multiple of its (2-element) all-gather alignment.
    bucket = 64 * max(1, math.ceil(p.bucket_mb * 2**20 / element_bytes / 64))
    zero: dict = {
        "stage": p.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        # Our gradient hooks (ZeroGradientRouter) decide when each gradient enters DeepSpeed's
        # reduce buckets; with overlap_comm a full bucket is reduced on DeepSpeed's reduction
        # stream while the backward pass goes on (on a CPU, a synchronized device, inline).
        "overlap_comm": True,
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = p.zero3_persistence_threshold
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed's own arithmetic over its data-parallel group (data x context ranks: each CP
        # rank counts the samples it holds a part of); only its consistency check reads it.
        "train_batch_size": t.micro_batch_size * accumulation * data_parallel,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite bf16 gradient skips the step as in fp16 and fp32.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        # loss_scale 0 = dynamic; the same constants as our own scaler (pretrain/optim.py).
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": LOSS_SCALE_INIT_POWER,
            "loss_scale_window": LOSS_SCALE_WINDOW,
            "hysteresis": LOSS_SCALE_HYSTERESIS,
            "min_loss_scale": LOSS_SCALE_MIN,
        },
        # Our torch AdamW steps the offloaded state on the CPU; DeepSpeed's CPU Adam would first
        # compile a C++ op, and would make the update differ from a run without ZeRO.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed's own progress lines would interleave
        "wall_clock_breakdown": False,
    }
