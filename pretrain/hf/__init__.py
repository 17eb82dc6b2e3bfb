"""Hugging Face conversion: our checkpoints <-> transformers' LlamaForCausalLM / Qwen2ForCausalLM /
GPT2LMHeadModel (a llama-flavour model with model.qkv_bias is a Qwen2), and for model.moe
MixtralForCausalLM / Qwen2MoeForCausalLM (pretrain/hf/moe_mapping.py).

Export (`tools/convert_to_hf.py`): read a checkpoint of any layout (pretrain/checkpoint/reader.py
merges the TP/PP shards), map the single-device state dict to the transformers names, and write
`config.json`, `generation_config.json`, `model.safetensors` and the tokenizer, so that
`from_pretrained(dir)` works offline and gives our logits.

Import (`tools/convert_from_hf.py`): read a local HF directory (safetensors only), build our run
config from its `config.json`, map the weights to our names and write step_0 of a checkpoint at
any TP/PP layout with the same writer the offline resharder uses.

The weight mapping is a pair of pure functions over state dicts per flavour (`*_to_hf`,
`*_from_hf`); everything else here is files. Facts of our model the mapping relies on
(pretrain/models/gpt.py):
  - the fused QKV rows are grouped per key/value head: for each kv head [its q heads, k, v];
  - SwiGLU's fc1 holds [gate; up];
  - RoPE is the rotate-half convention transformers' Llama uses, so q/k rows are not permuted;
    its settings (rope_theta, Llama 3's rope_scaling) are read and written in both transformers
    4.x and 5.x spellings (pretrain/hf/rope.py);
  - Qwen2's Q/K/V biases are fused into the QKV bias in the same row order as the weight;
  - the GPT-2 MLP is tanh-GeLU ("gelu_new");
  - the vocabulary tensors have `vocab_rows` rows (padded for TP); HF gets the real `vocab_size`.
"""

from pretrain.hf.convert import cli_error, export_checkpoint, import_checkpoint
from pretrain.hf.mapping import HFConversionError, model_fields_from_hf
from pretrain.hf.tokenizer import export_tokenizer

__all__ = [
    "HFConversionError",
    "cli_error",
    "export_checkpoint",
    "export_tokenizer",
    "import_checkpoint",
    "model_fields_from_hf",
]
