#!/usr/bin/env bash
# The main paths through the installed commands, a few steps each, as a user runs them: what CI's
# floors leg runs beside the quick tests (the full suite runs on the newest releases).
#   bash .ci/smoke.sh VENV_DIR
# quickstart (data-prep build, tiny model, LoRA training, base-vs-tuned eval, adapter loaded back),
# then QLoRA and DPO training, eval of the QLoRA adapter, merge, GGUF export, finetune verify, data-prep validate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(cd "$1/bin" && pwd)
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "-- smoke: $*"; }

step "finetune quickstart"
"$BIN/finetune" quickstart --output-dir "$W/qs" --overwrite >"$W/quickstart.log" 2>&1 || { tail -40 "$W/quickstart.log"; exit 1; }
Q="$W/qs"
"$BIN/python" - "$Q/quickstart.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("   quickstart:", json.dumps(s))
sys.exit(0 if s["tuned_exact_match"] - s["base_exact_match"] >= 0.5 else "the quickstart's tuned model did not beat the base")
PY
common=(model="$Q/base-model" data.train="$Q/data/train.jsonl" training.max_steps=3 training.batch_size=4
        max_length=256 training.report_to=[none] training.logging_steps=1)

step "finetune train adapter=qlora"
"$BIN/finetune" train "${common[@]}" adapter=qlora output_dir="$W/qlora" >"$W/qlora.log" 2>&1 || { tail -40 "$W/qlora.log"; exit 1; }
test -f "$W/qlora/adapter/adapter_model.safetensors"

step "finetune train method=dpo"
"$BIN/python" scripts/quickstart_pairs.py "$Q/data" "$W/pairs" >/dev/null
"$BIN/finetune" train "${common[@]}" data.train="$W/pairs/train.jsonl" method=dpo init_adapter="$Q/run/adapter" \
  output_dir="$W/dpo" >"$W/dpo.log" 2>&1 || { tail -40 "$W/dpo.log"; exit 1; }
test -f "$W/dpo/adapter/adapter_model.safetensors"

step "finetune eval (QLoRA adapter, 4-bit base)"
"$BIN/finetune" eval --adapter "$W/qlora/adapter" --data "$Q/data/test.jsonl" --output "$W/eval" --max-examples 8 \
  --max-new-tokens 8 --metrics exact_match >"$W/eval.log" 2>&1 || { tail -40 "$W/eval.log"; exit 1; }
test -f "$W/eval/report.json"

step "finetune merge + export (GGUF q8_0)"
"$BIN/finetune" merge --adapter "$Q/run/adapter" --output "$W/merged" >"$W/merge.log" 2>&1 || { tail -40 "$W/merge.log"; exit 1; }
test -f "$W/merged/config.json"
"$BIN/finetune" export --adapter "$Q/run/adapter" --output "$W/gguf" --quant q8_0 >"$W/export.log" 2>&1 || { tail -40 "$W/export.log"; exit 1; }
ls "$W/gguf"/*.gguf >/dev/null

step "finetune verify (checksums of the quickstart's data, run, merge and export)"
for p in "$Q/data" "$Q/run" "$W/merged" "$W/gguf"; do
  "$BIN/finetune" verify "$p" >"$W/verify.log" 2>&1 || { cat "$W/verify.log"; exit 1; }
done

step "data-prep validate"
"$BIN/data-prep" validate "$Q/data/train.jsonl" >/dev/null
echo "-- smoke: all paths ran"
