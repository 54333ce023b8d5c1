#!/usr/bin/env bash
# Reproduces models/default: trains several configurations side by side (one GPU is plenty for
# these small models), keeps the run with the best validation BLEU, and stores it in fp16.
#
#   NMT_DATA_DIR=../shared/data/multi30k scripts/train_default.sh OUT_DIR [MINUTES]
#
# NMT_TRAIN_EXTRA adds flags to every run (e.g. "--train-limit 500" for a smoke test).
# Each run stops at the first epoch end after MINUTES (default 7), or earlier on patience.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [MINUTES]}
minutes=${2:-7}
python=${PYTHON:-python3}
mkdir -p "$out"
common=(${NMT_TRAIN_EXTRA:-} --time-limit "$minutes" --max-epochs 200 --patience 25 --average-last 5 --no-progress --force)
declare -A runs=(
  [small_lr1e-3]="--preset small --lr 1e-3 --warmup 800"
  [small_lr1.5e-3_8k]="--preset small --lr 1.5e-3 --warmup 800 --max-tokens 8192"
  [tiny_lr2e-3]="--preset tiny --lr 2e-3 --warmup 800"
)
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  "$python" -m training.train --out "$out/$name" ${runs[$name]} "${common[@]}" >"$out/$name.log" 2>&1 &
done
wait || true
best=$("$python" - "$out" <<'EOF'
import json, pathlib, sys
scores = {}
for cfg in pathlib.Path(sys.argv[1]).glob("*/final/config.json"):
    scores[cfg.parent.parent.name] = json.loads(cfg.read_text())["info"]["valid_bleu"]
print(json.dumps(scores), file=sys.stderr)
print(max(scores, key=scores.get))
EOF
)
echo "best run: $best"
"$python" -m training.checkpoint "$out/$best/final" "$out/default" --dtype float16 --force
