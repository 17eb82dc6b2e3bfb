"""The two conversions as files: a checkpoint of any layout -> a transformers directory, and back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.reader import fit_rows
from pretrain.config import ConfigError, ModelConfig, RunConfig, config_from_dict
from pretrain.hf.mapping import (
    VOCAB_PARAMS,
    HFConversionError,
    Log,
    _warn,
    check_shapes,
    from_hf_state_dict,
    hf_config,
    model_fields_from_hf,
    model_params,
    to_hf_state_dict,
)
from pretrain.hf.tokenizer import export_tokenizer, import_tokenizer
from pretrain.models.sharding import shard_tensor

# ================================================================================================
# Files


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model directory: model.safetensors, or the shards a
    model.safetensors.index.json names. Pickled weights (.bin, .pt) are refused: unpickling a
    downloaded file can run arbitrary code."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFConversionError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
        if pickles:
            raise HFConversionError(
                f"{hf_dir} holds only pickled PyTorch weights ({', '.join(pickles[:3])}), which are not read "
                "here because unpickling a file can run arbitrary code; convert them to safetensors first "
                "where you trust them (e.g. model.save_pretrained(dir, safe_serialization=True))"
            )
        raise HFConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(_load_safetensors(path))
    return weights


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or damaged one (an interrupted download is the usual
    cause) is reported naming the file rather than as the library's bare deserializing error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HFConversionError(
            f"{path} is not a readable safetensors file ({e}); it is probably truncated "
            f"({path.stat().st_size} bytes): download it again"
        ) from None


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{hf_dir} is not a Hugging Face model directory: no config.json in it")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFConversionError(f"{path} is unreadable: {e}") from None


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise HFConversionError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise HFConversionError(
            f"--output {output} exists and is not empty; choose another directory or pass --force to overwrite"
        )


# ================================================================================================
# The two conversions


def export_checkpoint(
    checkpoint: str | Path, output: str | Path, *, force: bool = False, allow_non_finite: bool = False, log: Log = print
) -> Path:
    """Write the checkpoint (root with `latest`, or step_N; any TP/PP layout) as a transformers
    model directory; returns it. Weights holding NaN or Inf (a diverged run) are refused unless
    `allow_non_finite`."""
    from safetensors.torch import save_file

    from pretrain.checkpoint import SavedCheckpoint

    output = Path(output)
    saved = SavedCheckpoint(checkpoint)
    model = saved.config.model
    _check_output(output, force)
    state = {name: saved.full(name) for name in saved.names}
    if not allow_non_finite:
        _check_finite(state, saved.dir)
    hf_state = to_hf_state_dict(state, model)
    output.mkdir(parents=True, exist_ok=True)
    # Stale weights of an earlier export (--force) would be loaded alongside the new ones.
    for stale in [
        *output.glob("model*.safetensors"),
        output / "model.safetensors.index.json",
        *output.glob("pytorch_model*.bin"),
    ]:
        stale.unlink(missing_ok=True)
    save_file(hf_state, str(output / "model.safetensors"), metadata={"format": "pt"})

    ids = {"bos": None, "eos": None, "pad": None}
    tokenizer = saved.config.data.tokenizer
    if tokenizer and Path(tokenizer).exists():
        try:
            ids = export_tokenizer(tokenizer, output, max_length=model.positions)
        except (ValueError, ImportError, OSError) as e:  # the weights are still worth having
            _warn(f"tokenizer {tokenizer} was not exported: {e}")
    else:
        _warn(
            f"tokenizer {tokenizer!r} (data.tokenizer of {saved.dir}/config.yaml) not found: the model is "
            "exported without a tokenizer and without bos/eos/pad ids"
        )
    config = hf_config(model, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"])
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_generation_config(output, ids)
    log(
        f"exported {saved.dir} (step {saved.meta['step']}, layout tp={saved.tp} pp={saved.pp}) as "
        f"{config['architectures'][0]} to {output}"
    )
    return output


def _check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    """A model with NaN or Inf weights computes NaN for everyone who loads it: say which."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if t.is_floating_point()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        listed = ", ".join(f"{name} ({n} of {state[name].numel()})" for name, n in list(bad.items())[:4])
        raise HFConversionError(
            f"{where} holds non-finite weights (NaN or Inf) in {len(bad)} tensors: {listed}"
            f"{' ...' if len(bad) > 4 else ''}; it comes from a diverged run: export an earlier "
            "step_N/, or pass --allow-non-finite to export it anyway"
        )


def _write_generation_config(output: Path, ids: dict) -> None:
    try:
        from transformers import GenerationConfig
    except ImportError:  # the weights and config.json are still useful; say what is missing
        _warn("transformers is not installed: no generation_config.json written (pip install 'pretrain[hf]')")
        return
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(
        str(output)
    )


class HFSource:
    """Imported weights in the shape `pretrain.checkpoint.write_layout` reads a checkpoint:
    full tensors by our names, sliced per TP rank on request. No optimizer state."""

    has_optimizer = False

    def __init__(self, state: dict[str, torch.Tensor], model: ModelConfig) -> None:
        self.tensors = state
        skeleton = model_params(model)
        self.names = sorted(state)
        self.specs = {n: skeleton[n][0] for n in self.names}
        self.shapes = {n: list(t.shape) for n, t in state.items()}

    def optimizer_keys(self, name: str) -> list[str]:
        return []

    def shard(
        self, name: str, key: str | None = None, *, tp_rank: int, tp_size: int, rows: int | None = None
    ) -> torch.Tensor:
        assert key is None, "imported checkpoints hold no optimizer state"
        full = self.tensors[name]
        if name in VOCAB_PARAMS and rows is not None:
            full = fit_rows(full, rows)
        spec = self.specs[name]
        if spec is None:
            return full
        return shard_tensor(full, spec, rank=tp_rank, size=tp_size).contiguous()


# Model settings that decide the weights: an override may not change them.
_WEIGHT_FIELDS = (
    "flavour",
    "num_layers",
    "hidden_size",
    "num_heads",
    "kv_heads",
    "ffn_size",
    "vocab_size",
    "tied",
    "positions",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    "qkv_bias",
)


def _moe_weights(model: ModelConfig) -> tuple | None:
    """The model.moe settings that decide the weights and what they compute (the rest, such as
    the loss coefficients or a capacity, are training settings an import may override)."""
    moe = model.moe
    if moe is None:
        return None
    return (
        moe.num_experts,
        moe.top_k,
        moe.expert_ffn(model),
        moe.layer_interval,
        moe.shared_ffn(model),
        moe.shared_expert_gate,
        moe.router,
        moe.normalize_top_k,
    )


def import_config(hf: dict, overrides: list[str], *, tokenizer: Path | None) -> RunConfig:
    """Our run config for an HF config.json: model.* from it (padded_vocab_size unset, so it
    pads to 128 x parallel.tensor), data.tokenizer the copied tokenizer, then the overrides
    (layout, training settings). Overrides that would change the weights' shapes are refused."""
    from pretrain.config import validate_layout

    fields = model_fields_from_hf(hf)
    fields["seq_length"] = fields["max_position_embeddings"]
    raw = {"model": fields, "data": {"tokenizer": str(tokenizer) if tokenizer else ""}}
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise HFConversionError(f"{bad[0]!r}: overrides are key=value, e.g. parallel.tensor=2")
    try:
        reference = config_from_dict(raw).model
        config = config_from_dict(raw, overrides)
        validate_layout(config, config.parallel.tensor * config.parallel.pipeline)  # as reshard_checkpoint does
    except ConfigError as e:
        raise HFConversionError(str(e)) from None
    changed = [f for f in _WEIGHT_FIELDS if getattr(config.model, f) != getattr(reference, f)]
    if _moe_weights(config.model) != _moe_weights(reference):
        changed.append("moe")
    if changed:
        raise HFConversionError(
            f"model.{changed[0]}: the override changes what the Hugging Face weights "
            f"fix ({getattr(reference, changed[0])} in config.json); only layout and "
            "training settings can be overridden"
        )
    return config


def import_checkpoint(
    hf_dir: str | Path, output: str | Path, overrides: list[str] = (), *, force: bool = False, log: Log = print
) -> Path:
    """Write a local transformers LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel /
    MixtralForCausalLM / Qwen2MoeForCausalLM directory as step_0 of a
    checkpoint under `output`, at the layout the overrides choose; returns the step directory."""
    from pretrain.checkpoint import write_layout

    hf_dir, output = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise HFConversionError(f"--input {hf_dir} is not a directory")
    hf = read_hf_config(hf_dir)
    # Everything that can fail is checked before anything is written under `output`.
    config = import_config(hf, list(overrides), tokenizer=None)
    _check_output(output, force)
    state = from_hf_state_dict(read_hf_weights(hf_dir), config.model)
    check_shapes(state, config.model)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = import_tokenizer(hf_dir, output)
    if tokenizer is None:
        _warn(f"{hf_dir} has no tokenizer.json or tokenizer.model: data.tokenizer is left empty")
    config = import_config(hf, list(overrides), tokenizer=tokenizer)
    step_dir = write_layout(
        HFSource(state, config.model), config, output, step=0, train_state={"consumed_samples": 0}, data_parallel=1
    )
    p = config.parallel
    log(
        f"imported {hf_dir} ({(hf.get('architectures') or [hf.get('model_type')])[0]}) as {step_dir} at layout "
        f"tp={p.tensor} pp={p.pipeline}; train on it with: python -m pretrain.train {step_dir}/config.yaml "
        f"data.path=... checkpoint.resume={step_dir}"
    )
    return step_dir


def cli_error(message: str) -> int:
    """The tools' way to report a user mistake: `error: ...` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2
