#!/usr/bin/env bash
# Reproduces models/default: one run of the recipe in README ("How models/default was made"),
# about 80 minutes on 2 CPU cores (a GPU is used when there is one), then the inference
# settings chosen on the validation set, then an fp16 copy of the chosen weights.
#
#   NMT_DATA_DIR=../shared/data/multi30k scripts/train_default.sh OUT_DIR [--resume | --force] [nmt-train flags...]
#
# After an interruption, the same command continues from OUT_DIR/run/last (--force starts over).
# The result is OUT_DIR/model (fp16 checkpoint with its inference settings); the Makefile's
# train-default target copies it to models/default.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [--resume | --force] [nmt-train flags...]}
shift
python=${PYTHON:-python3}
mkdir -p "$out"

recipe=(
  --preset tiny --vocab-size 8000            # 4+4 layers, d_model 128, d_ff 256, 4 heads; joint vocabulary
  --dropout 0.3 --attention-dropout 0 --activation-dropout 0
  --lr 5e-3 --warmup 2000 --clip-norm 0 --label-smoothing 0.1
  --max-tokens 4096 --max-epochs 90
  --average-last 10 --valid-bleu-every 5 --patience 0
  --beam 5 --length-penalty 1.0              # replaced below by the validation sweep's choice
)
# Run again after an interruption: it resumes (unless --force or --resume is given).
mode=()
if [[ " $* " != *" --force "* && " $* " != *" --resume "* && -d "$out/run/last" ]]; then
  mode=(--resume)
  echo "resuming $out/run from its last checkpoint"
fi
"$python" -m nmt.training.train --out "$out/run" "${recipe[@]}" "${mode[@]}" "$@"

"$python" -m nmt.training.tune_inference --checkpoint "$out/run/final" --beams 1,4,5,6 --alphas 0.6,1.0,1.4,1.8,2.2 \
  --write --json "$out/inference_sweep.json"
"$python" -m nmt.training.checkpoint "$out/run/final" "$out/model" --dtype float16 --force
echo "trained: $out/model"
