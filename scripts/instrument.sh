#!/usr/bin/env bash
# The instrument tries on SmolLM2-135M-Instruct (results/smollm2-cpu/NOTES.md): can LoRA lift ARC-Easy
# accuracy clearly above chance and the untouched model at this scale? One try per argument:
#   bash scripts/instrument.sh protocol-4splits      # the protocol, the four training splits
#   bash scripts/instrument.sh untouched-cloze       # the untouched model, cloze scoring
#   bash scripts/instrument.sh cloze-arc             # LoRA in the cloze form (train.py --cloze)
#   bash scripts/instrument.sh memorise-64           # the check that the pipeline can learn labels at all
# Each writes results/smollm2-cpu/instrument/<try>/ (config.json, metrics.jsonl, results.*,
# predictions.jsonl); adapters and checkpoints stay out of git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/smollm2-cpu/instrument}
SPLITS=data/ARC-Easy/train.json,data/ARC-Challenge/train.json,data/boolq/train.json,data/openbookqa/train.json
EVAL=(--ckpt smollm2-135m --datasets ARC-Easy --num-beams 1 --precision bf16 --data-dir data)
case "$1" in
  untouched)
    python eval.py "${EVAL[@]}" --out "$OUT/untouched" ;;
  protocol-4splits)  # the recipe's settings, about 30 minutes of training on 2 cores
    python train.py --ckpt smollm2-135m --method lora --data "$SPLITS" --precision bf16 --seed 1 \
        --max-steps 450 --out "$OUT/$1"
    python eval.py "${EVAL[@]}" --adapter "$OUT/$1" ;;
  untouched-cloze)  # the untouched model in the cloze form: every choice's text ranked
    python eval.py "${EVAL[@]}" --scoring cloze --out "$OUT/untouched" ;;
  cloze-arc)  # the cloze form on the experiment's training records, one epoch, answer-only loss
    python train.py --ckpt smollm2-135m --method lora --cloze --answer-only-loss --epochs 1 --precision bf16 \
        --seed 1 --data data/ARC-Easy/train.json,data/ARC-Challenge/train.json --out "$OUT/$1"
    python eval.py "${EVAL[@]}" --scoring cloze --adapter "$OUT/$1" ;;
  memorise-64)  # the pipeline can learn labels: 25 epochs on the first 64 ARC-Easy training records,
                # then the protocol's greedy evaluation of those same 64 questions
    mkdir -p "$OUT/$1/data/ARC-Easy"
    python -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[:64], open(sys.argv[2], 'w'), indent=4)" \
        data/ARC-Easy/train.json "$OUT/$1/data/ARC-Easy/test.json"
    python train.py --ckpt smollm2-135m --method lora --answer-only-loss --epochs 25 --lr 2e-3 --warmup-steps 10 \
        --val-size 0 --precision bf16 --seed 1 --data "$OUT/$1/data/ARC-Easy/test.json" --out "$OUT/$1/run"
    python eval.py --ckpt smollm2-135m --datasets ARC-Easy --num-beams 1 --precision bf16 --data-dir "$OUT/$1/data" \
        --adapter "$OUT/$1/run" ;;
  *) echo "unknown try $1" >&2; exit 2 ;;
esac
