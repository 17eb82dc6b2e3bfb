"""Our tokenizer (sentencepiece or tokenizer.json) as a transformers fast tokenizer, and back."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pretrain.hf.mapping import HFConversionError, _warn

# ================================================================================================
# Tokenizer


# Files a Hugging Face tokenizer may consist of; replaced as a set on export, so a stale one
# from an earlier export cannot change how the new directory loads.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def _special_ids(tokenizer) -> dict:
    bos = getattr(tokenizer, "bos", None)
    return {"bos": bos if bos is not None and bos >= 0 else None, "eos": tokenizer.eod, "pad": tokenizer.pad}


def export_tokenizer(path: str, output: Path, *, max_length: int) -> dict:
    """Write the tokenizer our run used as a transformers fast tokenizer (tokenizer.json +
    tokenizer_config.json) that encodes text to the ids our tokenizer gives; returns its
    bos/eos/pad ids. Checked on a few probe strings before returning."""
    from pretrain.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

    ours = load_tokenizer(path)
    for name in _HF_TOKENIZER_FILES:
        (output / name).unlink(missing_ok=True)
    if isinstance(ours, SentencePieceTokenizer):
        _export_sentencepiece(ours, output, max_length=max_length)
    elif isinstance(ours, HFTokenizer):
        _export_tokenizer_json(ours, output, max_length=max_length)
    else:  # pragma: no cover - load_tokenizer returns one of the two
        raise HFConversionError(f"{path}: no Hugging Face export for tokenizer type {type(ours).__name__}")
    _verify_tokenizer(ours, output)
    return _special_ids(ours)


def _export_sentencepiece(ours, output: Path, *, max_length: int) -> None:
    """transformers converts a sentencepiece model to a `tokenizers` BPE/Unigram pipeline that
    follows the model's own normalizer spec (identity normalization, no dummy prefix, byte
    fallback: what tools/train_tokenizer.py trains). The class-specific tokenizers
    (LlamaTokenizer) rebuild that pipeline with Llama's own rules (a "▁" prepended to the text)
    and give other ids, so the generic fast tokenizer is used and saved as tokenizer.json.
    Special pieces typed in the text ("<s>") are plain text to sentencepiece's encode; the fast
    tokenizer matches them as special tokens unless split_special_tokens is set."""
    from transformers import PreTrainedTokenizerFast

    sp = ours._sp
    pieces = {
        "unk_token": sp.unk_id(),
        "bos_token": sp.bos_id(),
        "eos_token": sp.eos_id(),
        "pad_token": sp.pad_id(),
        "mask_token": ours.mask,
    }
    specials = {k: sp.id_to_piece(i) for k, i in pieces.items() if i is not None and i >= 0}
    settings = {
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(ours.path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings))
        fast = PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
        converted = json.loads(fast.backend_tokenizer.to_str())
    if converted["model"]["type"] == "Unigram":
        _unreachable_special_pieces(converted, sp)
    (output / "tokenizer.json").write_text(json.dumps(converted, ensure_ascii=False), encoding="utf-8")
    # The .model file too, for tools that read sentencepiece directly (and for convert_from_hf,
    # which then trains on the very same tokenizer); tokenizer.json wins in transformers.
    shutil.copyfile(ours.path, output / "tokenizer.model")
    _write_tokenizer_config(output, {**settings, "tokenizer_class": "PreTrainedTokenizerFast"})


# Far below any sum of real piece scores over a few characters.
_UNREACHABLE_SCORE = -1e6


def _unreachable_special_pieces(tokenizer_json: dict, sp) -> None:
    """sentencepiece's unigram search only ever matches normal (and user-defined) pieces, so a
    text that spells "</s>" or "<0x41>" is encoded character by character; the `tokenizers`
    Unigram model searches its whole vocabulary and would pick the control, unknown and byte
    pieces as one token. Their scores are pushed out of reach (unknown characters still map to
    unk and byte fallback through the model's own rule, not through these scores). BPE needs no
    such care: no merge produces those pieces."""
    vocab = tokenizer_json["model"]["vocab"]  # [[piece, score], ...] in id order
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            vocab[i][1] = _UNREACHABLE_SCORE


def _export_tokenizer_json(ours, output: Path, *, max_length: int) -> None:
    """A tokenizer.json we trained with is copied with what `HFTokenizer` ignores taken out, so
    that transformers' default encode(text) gives our ids: the post-processor (we encode with
    add_special_tokens=False and preprocessing appends the end-of-document token itself, so the
    model never saw the BOS it would add), and truncation and padding settings. The
    tokenizer_config.json names our special tokens and makes typed ones ("</s>") text, as ours
    does."""
    tok = json.loads(Path(ours.path).read_text(encoding="utf-8"))
    tok["post_processor"] = None
    tok["truncation"] = None
    tok["padding"] = None
    (output / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    settings = {**ours.tokenizer_config(), "model_max_length": max_length}
    _write_tokenizer_config(output, settings)


def _write_tokenizer_config(output: Path, settings: dict) -> None:
    """tokenizer_config.json, and special_tokens_map.json with the special tokens' names for
    tools that read only that file (transformers itself reads the names from the first)."""
    (output / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    specials = {k: v for k, v in settings.items() if k.endswith("_token") and isinstance(v, str)}
    (output / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


# Code-like probes with the cases that tell tokenizers apart: indentation runs, digits, a
# leading space, tabs and newlines, non-ASCII (byte fallback), a special piece typed as text.
TOKENIZER_PROBES = (
    "def main(argv=None):\n    return 0\n",
    "  x = [1, 22, 333]\t# é 中 😀\n\n",
    "class A:\n\tpass</s><s>",
    " leading space and trailing ",
)


def _verify_tokenizer(ours, output: Path) -> None:
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(output), local_files_only=True)
    except Exception as e:  # transformers' own failure, named
        _warn(f"the exported tokenizer does not load with transformers' AutoTokenizer: {e}")
        return
    for text in TOKENIZER_PROBES:
        if theirs.encode(text) != ours.encode(text):
            _warn(
                f"the exported tokenizer encodes {text!r} differently from ours "
                f"({theirs.encode(text)[:8]} vs {ours.encode(text)[:8]}); check it before use"
            )
            return


def import_tokenizer(hf_dir: Path, output: Path) -> Path | None:
    """Copy the HF directory's tokenizer where our run config can name it; returns the file
    data.tokenizer should point at, or None. A sentencepiece tokenizer.model wins when it loads
    (it is the original of a sentencepiece-based tokenizer.json); else tokenizer.json with its
    tokenizer_config.json (which names the end-of-document token)."""
    from pretrain.data.tokenizer import load_tokenizer

    target = output / "tokenizer"
    if (hf_dir / "tokenizer.model").is_file():
        try:
            load_tokenizer(str(hf_dir / "tokenizer.model"))
        except ValueError:
            pass  # e.g. a tiktoken file under that name: use tokenizer.json
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hf_dir / "tokenizer.model", target / "tokenizer.model")
            return (target / "tokenizer.model").resolve()
    if (hf_dir / "tokenizer.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, target / name)
        try:
            load_tokenizer(str(target / "tokenizer.json"))
        except ValueError as e:
            _warn(f"{hf_dir}/tokenizer.json cannot serve as data.tokenizer ({e}); set data.tokenizer yourself")
            return None
        return (target / "tokenizer.json").resolve()
    return None
