"""Build a GPT (or one pipeline chunk of it) straight on its device, in the dtype it trains in.

`GPT(...)` under `with torch.device(gpu)` allocates every parameter in fp32 (and runs torch's
default init on it) before `reset_parameters` overwrites it; under ZeRO with bf16/fp16 DeepSpeed
then casts the module to 16 bits, so the whole fp32 model existed on the GPU for nothing
(~12.9 GB at 13B / TP4). Here the module tree is built on the meta device (shapes only) and
each parameter is then created on its device and filled with its initial value, one at a time:
the only transient beyond the final weights is one parameter's full fp32 value (the largest,
the embedding, is vocab x hidden). The values are the ones `GPT.reset_parameters` writes, drawn
on the same device, so every layout and every existing test sees the same initial weights.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.gpt import GPT, Stage


def build_gpt(
    config: ModelConfig,
    *,
    init_seed: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    layers=None,
    stage: Stage | None = None,
) -> GPT:
    """`GPT(config, layers=layers, stage=stage, init_seed=init_seed)` with its parameters in
    `dtype` on `device` (default: the current default device, so under `with torch.device(d)`
    this is a drop-in for GPT(...)), never holding more than one fp32 parameter beyond them."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"), _SkipDefaultInit():
        model = GPT(config, layers=layers, stage=stage, init_seed=init_seed)  # reset_parameters skips meta
    materialize(model, device=device, dtype=dtype, seed=init_seed)
    return model


class _SkipDefaultInit(torch.overrides.TorchFunctionMode):
    """torch's own init in nn.Linear / nn.Embedding constructors, skipped: on meta tensors it
    computes nothing, yet its first use imports torch._dynamo (the meta normal_ lives in
    torch._refs), ~3.5 s per process on this CPU, and every value is set by materialize anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":  # init.normal_(tensor, ...) and kin
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@torch.no_grad()
def materialize(model: GPT, *, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Replace each meta parameter of `model` by its initial value on `device` in `dtype`,
    keeping what other code reads off parameters (`sharding`, pretrain/models/sharding.py),
    then derive the buffers on `device`."""
    if device.type == "meta":
        return
    done: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays one parameter
    for module_name, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                name = f"{module_name}.{key}" if module_name else key
                value = model.initial_value(name, param, seed=seed, device=device).to(dtype)
                fresh = nn.Parameter(value, requires_grad=param.requires_grad)
                # Only what we marked: a fake tensor's own attributes (the dry run's) must not travel.
                if "sharding" in vars(param):
                    fresh.sharding = param.sharding
                done[id(param)] = fresh
            module._parameters[key] = done[id(param)]
    with torch.device(device):
        model.make_buffers()
