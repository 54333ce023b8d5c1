#!/usr/bin/env bash
# sacreBLEU (cased, 13a) and chrF of an exported bundle through the ONNX Runtime engine, with the
# bundle's own inference settings (what the server does), on a Multi30k test set.
#
#   NMT_DATA_DIR=../shared/data/multi30k scripts/score_bundle.sh BUNDLE SPLIT [PRECISION] [nmt-translate flags...]
#
# PRECISION: auto, fp32 (fp32-cpu on the CPU), int8 (int8-cpu) or fp16 (CUDA); default auto.
set -euo pipefail
bundle=${1:?usage: $0 BUNDLE SPLIT [PRECISION] [flags...]}
split=${2:?usage: $0 BUNDLE SPLIT [PRECISION] [flags...]}
precision=${3:-auto}
shift $(( $# < 3 ? $# : 3 ))
bin=${BIN:-.venv/bin}
data=${NMT_DATA_DIR:?set NMT_DATA_DIR to the Multi30k directory}
read_split() { if [[ -f "$data/$split.$1.gz" ]]; then gzip -dc "$data/$split.$1.gz"; else cat "$data/$split.$1"; fi; }
hyp=$(mktemp) ref=$(mktemp)
trap 'rm -f "$hyp" "$ref"' EXIT
# The bundle's own language pair (manifest.json), e.g. en -> de or en -> fr.
read -r src tgt < <("$bin/python" -c 'import json, sys; m = json.load(open(sys.argv[1] + "/manifest.json"))
print(m["src_lang"], m["tgt_lang"])' "$bundle")
read_split "$src" | "$bin/nmt-translate" --bundle "$bundle" --precision "$precision" --quiet "$@" > "$hyp"
read_split "$tgt" > "$ref"
echo "$split ($precision):"
"$bin/sacrebleu" "$ref" -i "$hyp" -m bleu chrf -w 2 --format text
