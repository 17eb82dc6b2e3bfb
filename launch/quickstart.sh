#!/usr/bin/env bash
# The main job on the embedded default corpus, end to end on a CPU in under 10 minutes:
# the Python standard library's own sources -> JSONL -> sentencepiece tokenizer -> .bin/.idx ->
# a tiny GPT trained until validation loss falls -> a sample -> a metrics plot -> the model in
# Hugging Face format (transformers loads it with from_pretrained).
# Everything is written under $QUICKSTART_DIR (default ./quickstart). Re-running skips finished
# steps and resumes training from the latest checkpoint.
# Extra arguments are passed to the trainer as overrides, e.g. `train.steps=100`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
QS=${QUICKSTART_DIR:-./quickstart}
CONFIG=${QUICKSTART_CONFIG:-$ROOT/configs/gpt_tiny.yaml}
VOCAB=${QUICKSTART_VOCAB:-8000}
mkdir -p "$QS"
QS=$(cd "$QS" && pwd)
START=$SECONDS

step() { printf '\n== [%s] %s (%ss elapsed)\n' "$1" "$2" "$((SECONDS - START))"; }

if ! "$PY" -c "import pretrain, torch, sentencepiece, yaml, tensorboard, matplotlib, safetensors, transformers" 2>/dev/null; then
  step 0/7 "installing pretrain and its requirements (CPU torch pinned by constraints.txt)"
  "$PY" -m pip install -q -c "$ROOT/constraints.txt" -e "${ROOT}[hf]"
fi

step 1/7 "corpus: the Python standard library's source files -> $QS/corpus.jsonl"
if [ ! -s "$QS/corpus.jsonl" ]; then
  "$PY" "$ROOT/tools/make_stdlib_corpus.py" --output "$QS/corpus.jsonl"
else
  echo "exists, skipped"
fi

step 2/7 "tokenizer: sentencepiece BPE, vocabulary $VOCAB -> $QS/tokenizer.model"
if [ ! -s "$QS/tokenizer.model" ]; then
  "$PY" "$ROOT/tools/train_tokenizer.py" --input "$QS/corpus.jsonl" --output "$QS/tokenizer" \
    --vocab-size "$VOCAB" --model-type bpe
else
  echo "exists, skipped"
fi

step 3/7 "preprocess: tokenize with end-of-document tokens -> $QS/data/stdlib_text_document.bin/.idx"
mkdir -p "$QS/data"
if [ ! -s "$QS/data/stdlib_text_document.idx" ]; then
  "$PY" "$ROOT/tools/preprocess_data.py" --input "$QS/corpus.jsonl" --output-prefix "$QS/data/stdlib" \
    --tokenizer "$QS/tokenizer.model" --json-keys text --append-eod --workers "$(nproc)"
else
  echo "exists, skipped"
fi

step 4/7 "train: $(basename "$CONFIG") on $(nproc) CPU cores"
"$PY" -m pretrain.train "$CONFIG" \
  data.path="$QS/data/stdlib_text_document" data.tokenizer="$QS/tokenizer.model" \
  model.vocab_size="$VOCAB" checkpoint.dir="$QS/checkpoints" logging.dir="$QS/logs" "$@"

step 5/7 "sample: the trained model continues a prompt"
"$PY" "$ROOT/tools/generate.py" --checkpoint "$QS/checkpoints" --prompt "def " \
  --max-new-tokens 80 --temperature 0.7

step 6/7 "plot: loss and throughput -> $QS/logs/metrics.png"
"$PY" "$ROOT/tools/plot_metrics.py" "$QS/logs"

step 7/7 "export: Hugging Face format -> $QS/hf (model.safetensors, config.json, tokenizer)"
"$PY" "$ROOT/tools/convert_to_hf.py" --checkpoint "$QS/checkpoints" --output "$QS/hf" --force

"$PY" - "$QS/logs/metrics.jsonl" <<'PYEOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
val = [r for r in records if "val_loss" in r]
train = [r for r in records if "loss" in r]
if len(val) >= 2:
    print(f"\nvalidation loss: {val[0]['val_loss']:.3f} at step {val[0]['step']} -> "
          f"{val[-1]['val_loss']:.3f} at step {val[-1]['step']}")
if train:
    print(f"last step {train[-1]['step']}: {train[-1]['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * train[-1]['mfu']:.1f}%")
PYEOF

cat <<TXT

done in $((SECONDS - START)) s. Everything is under $QS:
  corpus        $QS/corpus.jsonl
  tokenizer     $QS/tokenizer.model
  dataset       $QS/data/stdlib_text_document.bin/.idx
  checkpoints   $QS/checkpoints (latest: $(cat "$QS/checkpoints/latest" 2>/dev/null || echo none))
  metrics       $QS/logs/metrics.jsonl, plot $QS/logs/metrics.png
  tensorboard   tensorboard --logdir $QS/logs/tensorboard
  hf model      $QS/hf (AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained)
TXT
