#!/usr/bin/env bash
# The GPU check (issue 17): on a machine with one NVIDIA GPU, Python 3.11, pip and this repository
# (with ../shared beside it), in about 8 minutes:
#   1. a venv (build/gpu-check-venv) with torch (CPU build: only the export needs it),
#      onnxruntime-gpu 1.31.1 from deploy/constraints/cuda.txt and its CUDA 13 + cuDNN 9 runtime
#      wheels (scripts/gpu_check.py CUDA_WHEELS), CTranslate2; a MatMul must run on CUDAExecutionProvider;
#   2. nmt-export of models/default with the fp16-cuda variant (its parity checked on the GPU and
#      recorded in the manifest: must not be skipped), nmt-export --verify, and the start-up
#      self-check (engine/selfcheck.py) run on the GPU;
#   3. nmt-serve --device cuda --precision fp16 (port 0, --port-file), then over gRPC: health,
#      info, 3 translations that must be German, nmt_engine_info on /metrics; SIGTERM must exit 0;
#   4. nmt-bench decode, small (see GPU_CHECK_BENCH_* below);
# every log and result under OUT_DIR, OUT_DIR/summary.txt printed at the end. Any failure: a line
# `FAILED: step N (name): ...` on stderr and in summary.txt, the failing log's tail, exit 1.
#
#   scripts/gpu_check.sh OUT_DIR
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh OUT_DIR   # the same steps on the CPU provider (fp32-cpu),
#                                                       # in the repository's .venv (make test's), small
# Environment (defaults for cuda / cpu):
#   GPU_CHECK_DEVICE         cuda | cpu (cuda)
#   GPU_CHECK_MODEL          checkpoint to export (models/default)
#   NMT_DATA_DIR             Multi30k: parity set, shortlist, bench sentences (../shared/data/multi30k)
#   GPU_CHECK_VENV           the venv (build/gpu-check-venv / .venv)
#   GPU_CHECK_INSTALL        1: create the venv if missing and install into it; 0: use it as it is (1 / 0)
#   PYTHON                   interpreter for a new venv (python3.11, else python3; 3.11 or later)
#   TORCH_WHEEL_DIR          a directory with a torch-<version>+cpu wheel to install (/opt/wheels; also build/wheels)
#   TORCH_INDEX_URL          else torch's CPU index (https://download.pytorch.org/whl/cpu); where that is out
#                            of reach, PyPI's torch (the CUDA build, ~3 GB with its nvidia-* wheels)
#   GPU_CHECK_PARITY_LIMIT   parity sentences of test_2016_flickr (all 1000 / 16)
#   GPU_CHECK_BENCH_SENTENCES, GPU_CHECK_BENCH_BATCHES, GPU_CHECK_BENCH_ENGINES, GPU_CHECK_BENCH_ARGS
#                            nmt-bench decode's --sentences (64 / 4), --batch-sizes (1,8 / 2),
#                            --engines (ort-fp32,ort-fp16,ct2-float32,ct2-float16 / torch,ort-fp32,ct2-float32;
#                            torch is left out on cuda: the venv's torch is normally the CPU build, and
#                            a skipped engine fails the step), extra flags (none)
#   GPU_CHECK_THREADS        ORT/CT2/torch threads of the server and the bench (4 / 1)
#   GPU_CHECK_FORCE          1: replace this script's earlier results in a non-empty OUT_DIR
#
# Step 4 passes `--device $GPU_CHECK_DEVICE` to nmt-bench decode when its --help lists --device (an
# older one without it runs on the CPU only, and the summary then says the GPU engines were not measured).
set -Eeuo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: [GPU_CHECK_DEVICE=cuda|cpu] $0 OUT_DIR   (the header of $0 lists the other variables)" >&2
  exit 2
fi
CALLER=$PWD
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
given() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # a path the caller gave, absolute
DEVICE=${GPU_CHECK_DEVICE:-cuda}
case "$DEVICE" in
  cuda) VARIANT=fp16-cuda PRECISION=fp16 PROVIDER=CUDAExecutionProvider ;;
  cpu) VARIANT=fp32-cpu PRECISION=fp32 PROVIDER=CPUExecutionProvider ;;
  *) echo "GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
small() { if [ "$DEVICE" = cuda ]; then echo "$1"; else echo "$2"; fi; }
MODEL=models/default DATA_DIR=../shared/data/multi30k VENV=$(small build/gpu-check-venv .venv)
[ -z "${GPU_CHECK_MODEL:-}" ] || MODEL=$(given "$GPU_CHECK_MODEL")
[ -z "${NMT_DATA_DIR:-}" ] || DATA_DIR=$(given "$NMT_DATA_DIR")
[ -z "${GPU_CHECK_VENV:-}" ] || VENV=$(given "$GPU_CHECK_VENV")
INSTALL=${GPU_CHECK_INSTALL:-$(small 1 0)}
PARITY_LIMIT=${GPU_CHECK_PARITY_LIMIT:-$(small "" 16)}
BENCH_SENTENCES=${GPU_CHECK_BENCH_SENTENCES:-$(small 64 4)}
BENCH_BATCHES=${GPU_CHECK_BENCH_BATCHES:-$(small 1,8 2)}
BENCH_ENGINES=${GPU_CHECK_BENCH_ENGINES:-$(small ort-fp32,ort-fp16,ct2-float32,ct2-float16 torch,ort-fp32,ct2-float32)}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}
THREADS=${GPU_CHECK_THREADS:-$(small 4 1)}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# Seconds per command (a timeout is that step's failure); together under 8 minutes on a GPU machine
# whose installs are fast: the install is the one that depends on the network.
T_INSTALL=$(small 420 300) T_EXPORT=$(small 240 150) T_CHECK=120 T_SERVE=120 T_CALL=60 T_BENCH=$(small 180 150)

# nmt-serve and nmt-client read NMT_* (a token, TLS files, NMT_TARGET, NMT_PORT): none may leak in.
for name in $(compgen -e); do
  case "$name" in NMT_DATA_DIR) ;; NMT_*) unset "$name" ;; esac
done

OUT=$(given "$1")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
OWN=(env.txt env.json requirements.txt parity.json selfcheck.json summary.txt logs bundle serve decode)
if [ -n "$(ls -A "$OUT")" ]; then
  [ "${GPU_CHECK_FORCE:-0}" = 1 ] || { echo "$OUT is not empty; pass GPU_CHECK_FORCE=1 to replace its results" >&2; exit 2; }
  for f in "${OWN[@]}"; do rm -rf "${OUT:?}/$f"; done
fi
mkdir -p "$OUT/logs" "$OUT/serve"

STEP=0 STEP_NAME=setup STEP_START=$SECONDS CURRENT_LOG="" SERVER_PID=""
SUMMARY=("gpu_check: device $DEVICE, variant $VARIANT, model $MODEL, out $OUT")

write_summary() {  # STATUS
  SUMMARY+=("gpu_check: $1 in $SECONDS s")
  printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
  printf '\n'; cat "$OUT/summary.txt"
}
fail() {
  local line="FAILED: step $STEP ($STEP_NAME): $*"
  trap - ERR
  if [ -n "$CURRENT_LOG" ] && [ -s "$CURRENT_LOG" ]; then
    echo "--- last lines of $CURRENT_LOG" >&2
    tail -n 25 "$CURRENT_LOG" >&2
  fi
  echo "$line" >&2
  SUMMARY+=("$line")
  write_summary FAILED
  exit 1
}
on_err() {  # a command outside run() failed: in a subshell just pass the status up
  local rc=$? command=$BASH_COMMAND
  [ "$BASHPID" = "$$" ] || exit "$rc"
  fail "'$command' exited $rc (line $1)"
}
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
trap 'on_err $LINENO' ERR
trap stop_server EXIT

begin() {  # N NAME
  STEP=$1 STEP_NAME=$2 STEP_START=$SECONDS CURRENT_LOG=""
  printf '\n== step %s: %s\n' "$1" "$2"
}
ok() {  # SUMMARY TEXT
  SUMMARY+=("step $STEP $STEP_NAME: OK ($((SECONDS - STEP_START)) s): $*")
  echo "step $STEP $STEP_NAME: OK: $*"
}
# run LOG SECONDS [--stdout FILE] COMMAND...: output to logs/STEP-LOG.log (stdout to FILE if given);
# non-zero or past SECONDS fails the step.
run() {
  local name=$1 seconds=$2 stdout="" rc=0
  shift 2
  if [ "$1" = --stdout ]; then stdout=$2; shift 2; fi
  CURRENT_LOG=$OUT/logs/$STEP-$name.log
  printf '+ %s\n' "$*" >>"$CURRENT_LOG"
  echo "  $name: $*"
  if [ -n "$stdout" ]; then
    timeout -k 10 "$seconds" "$@" >"$stdout" 2>>"$CURRENT_LOG" || rc=$?
  else
    timeout -k 10 "$seconds" "$@" >>"$CURRENT_LOG" 2>&1 || rc=$?
  fi
  [ "$rc" -eq 0 ] && return 0
  [ "$rc" -eq 124 ] && fail "$name timed out after $seconds s: $* (log: $CURRENT_LOG)"
  fail "$name exited $rc: $(grep -v '^[[:space:]]*$' "$CURRENT_LOG" | tail -n 1 | cut -c1-400) (log: $CURRENT_LOG)"
}
json() {  # FILE EXPRESSION: a value from a JSON file (d is the document)
  python -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# ---- 1: the venv ----
begin 1 install
{ date -u; uname -a; echo "device $DEVICE"; command -v nvidia-smi >/dev/null && nvidia-smi; } >"$OUT/env.txt" 2>&1 || true
if [ "$DEVICE" = cuda ] && ! command -v nvidia-smi >/dev/null; then
  echo "  warning: no nvidia-smi on PATH (the driver's tools); the CUDA provider check decides"
fi
[ -f "$MODEL/config.json" ] || fail "no checkpoint at $MODEL (GPU_CHECK_MODEL)"
[ -f "$DATA_DIR/test_2016_flickr.en.gz" ] || [ -f "$DATA_DIR/test_2016_flickr.en" ] ||
  fail "no Multi30k at $DATA_DIR (NMT_DATA_DIR): the parity set and the bench need test_2016_flickr"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
export NMT_DATA_DIR=$DATA_DIR
torch_note=""
if [ "$INSTALL" = 1 ]; then
  PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    fail "$PYTHON is not Python 3.11 or later (set PYTHON)"
  [ -x "$VENV/bin/python" ] || run venv 120 "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    torch_note="torch already there"
  else
    wheel=""
    for found in "$TORCH_WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-"$tag"-*.whl build/wheels/torch-"$TORCH_VERSION"+cpu-"$tag"-*.whl; do
      if [ -f "$found" ] && [ -z "$wheel" ]; then wheel=$found; fi
    done
    if [ -n "$wheel" ]; then
      run torch "$T_INSTALL" "${pip[@]}" install --no-deps "$wheel"
      torch_note="torch from $wheel"
    elif timeout -k 5 "$T_INSTALL" "${pip[@]}" install --no-deps --timeout 20 --retries 1 --index-url "$TORCH_INDEX_URL" \
        "torch==$TORCH_VERSION+cpu" >>"$OUT/logs/1-torch.log" 2>&1; then
      torch_note="torch (CPU) from $TORCH_INDEX_URL"
    else
      echo "  $TORCH_INDEX_URL is out of reach: PyPI's torch==$TORCH_VERSION (CUDA build, ~3 GB with its nvidia-* wheels)"
      torch_note="torch (CUDA build) from PyPI"
    fi
  fi
  pins=()
  "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null && pins=(--no-cuda-pins)
  [ "$torch_note" = "torch (CUDA build) from PyPI" ] && pins=(--no-cuda-pins)
  "$PYTHON" scripts/gpu_check.py requirements "${pins[@]}" >"$OUT/requirements.txt"
  torch_req="torch==$TORCH_VERSION"
  run pip "$T_INSTALL" "${pip[@]}" install --constraint deploy/constraints/cuda.txt \
    --constraint deploy/constraints/export.txt "$torch_req" -r "$OUT/requirements.txt"
  run project 120 "${pip[@]}" install --no-deps -e .
  run pip-check 60 "${pip[@]}" check
else
  [ -x "$VENV/bin/python" ] || fail "no venv at $VENV (make test creates .venv; or GPU_CHECK_INSTALL=1)"
  torch_note="venv $VENV as it is"
fi
VENV=$(cd "$VENV" && pwd)
export PATH=$VENV/bin:$PATH VIRTUAL_ENV=$VENV
# The CUDA 13 / cuDNN 9 wheels' libraries (nvidia/cu13/lib, nvidia/cudnn/lib) for onnxruntime's CUDA provider.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name lib 2>/dev/null | sort | paste -sd: || true)
[ -z "$libs" ] || export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$OUT/env.txt"
run env "$T_CHECK" --stdout "$OUT/logs/1-env.out" python scripts/gpu_check.py env --device "$DEVICE" --out "$OUT/env.json"
ok "$torch_note; onnxruntime $(json "$OUT/env.json" 'd["onnxruntime"]') with $(json "$OUT/env.json" '", ".join(d["providers"])'); torch $(json "$OUT/env.json" 'd["torch"]'); ctranslate2 $(json "$OUT/env.json" 'd["ctranslate2"]') (CUDA devices: $(json "$OUT/env.json" 'd["ctranslate2_cuda_devices"]'))"

# ---- 2: export, parity, self-check ----
begin 2 export
BUNDLE=$OUT/bundle
limit=()
[ -z "$PARITY_LIMIT" ] || limit=(--parity-limit "$PARITY_LIMIT")
run export "$T_EXPORT" --stdout "$OUT/logs/2-export.out" nmt-export "$MODEL" "$BUNDLE" --variants "$VARIANT" \
  --data-dir "$DATA_DIR" "${limit[@]}" --quiet --force
run verify "$T_CHECK" --stdout "$OUT/logs/2-verify.out" nmt-export --verify "$BUNDLE"
run parity "$T_CHECK" --stdout "$OUT/logs/2-parity.out" python scripts/gpu_check.py parity "$BUNDLE" \
  --variant "$VARIANT" --provider "$PROVIDER" --out "$OUT/parity.json"
run selfcheck "$T_CHECK" --stdout "$OUT/logs/2-selfcheck.out" python scripts/gpu_check.py selfcheck "$BUNDLE" \
  --device "$DEVICE" --precision "$PRECISION" --out "$OUT/selfcheck.json"
ok "$VARIANT parity on $(json "$OUT/parity.json" 'd["sentences"]') sentences: $(json "$OUT/parity.json" 'd["brief"]'); self-check on $(json "$OUT/selfcheck.json" 'd["provider"]'): $(json "$OUT/selfcheck.json" 'd["sentences"]') reference sentences identical"

# ---- 3: serve and translate over gRPC ----
begin 3 serve
PORTS=$OUT/serve/ports.json
CURRENT_LOG=$OUT/logs/3-serve.log
echo "  nmt-serve --device $DEVICE --precision $PRECISION (log: $CURRENT_LOG)"
nmt-serve --model-dir "$BUNDLE" --device "$DEVICE" --precision "$PRECISION" --threads "$THREADS" --host 127.0.0.1 \
  --port 0 --metrics-port 0 --port-file "$PORTS" --grace-seconds 5 --log-level INFO >>"$CURRENT_LOG" 2>&1 &
SERVER_PID=$!
deadline=$((SECONDS + T_SERVE))
until [ -s "$PORTS" ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    rc=0; wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    fail "nmt-serve exited $rc before serving (log: $CURRENT_LOG)"
  fi
  [ "$SECONDS" -lt "$deadline" ] || fail "nmt-serve did not serve within $T_SERVE s (log: $CURRENT_LOG)"
  sleep 0.5
done
PORT=$(json "$PORTS" 'd["port"]')
METRICS_PORT=$(json "$PORTS" 'd["metrics_port"]')
client=(nmt-client --target "127.0.0.1:$PORT" --deadline "$T_CALL")
run health "$T_CALL" --stdout "$OUT/serve/health.txt" "${client[@]}" health
run info "$T_CALL" --stdout "$OUT/serve/info.txt" "${client[@]}" info
grep -q "provider: \"$PROVIDER\"" "$OUT/serve/info.txt" || fail "nmt-client info does not name $PROVIDER: $(tr '\n' ' ' <"$OUT/serve/info.txt")"
mapfile -t TEXTS < <(python scripts/gpu_check.py texts)
printf '%s\n' "${TEXTS[@]}" >"$OUT/serve/sources.txt"
run translate "$T_CALL" --stdout "$OUT/serve/translations.txt" "${client[@]}" translate "${TEXTS[@]}"
run german "$T_CALL" --stdout "$OUT/logs/3-german.out" python scripts/gpu_check.py german "$OUT/serve/translations.txt"
run metrics "$T_CALL" --stdout "$OUT/logs/3-metrics.out" python scripts/gpu_check.py metrics \
  "http://127.0.0.1:$METRICS_PORT/metrics" --provider "$PROVIDER" --out "$OUT/serve/engine_info.json"
CURRENT_LOG=$OUT/logs/3-serve.log
kill -TERM "$SERVER_PID"
rc=0; timeout 30 tail --pid="$SERVER_PID" -f /dev/null || fail "nmt-serve did not exit within 30 s of SIGTERM"
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[ "$rc" -eq 0 ] || fail "nmt-serve exited $rc on SIGTERM (log: $CURRENT_LOG)"
[ ! -e "$PORTS" ] || fail "nmt-serve left its port file $PORTS behind"
ok "$(json "$OUT/serve/engine_info.json" '"variant %s on %s, self-check %s" % (d["variant"], d["provider"], d["selfcheck"])'); \"${TEXTS[0]}\" -> \"$(head -n 1 "$OUT/serve/translations.txt")\"; SIGTERM: exit 0"

# ---- 4: decode benchmark ----
begin 4 decode-bench
mkdir -p "$OUT/decode/cache"
# The bench reuses a bundle of the same checkpoint in its cache: step 2's (hard links: no second export,
# and a re-export there could not touch step 2's files).
cp -al "$BUNDLE" "$OUT/decode/cache/fused" 2>/dev/null || cp -a "$BUNDLE" "$OUT/decode/cache/fused"
extra=()
read -r -a extra <<<"$BENCH_ARGS"
gpu_note=""
usage=$(nmt-bench decode --help 2>&1 || true)
if grep -q -- '--device' <<<"$usage"; then
  extra=(--device "$DEVICE" "${extra[@]}")
elif [ "$DEVICE" = cuda ]; then
  gpu_note="GPU engines NOT MEASURED: nmt-bench decode has no --device (bench/engines.py: OrtEngine and CT2Engine run on device \"cpu\") and no ORT fp16 / CT2 float16 engine; these rows are CPU"
fi
run decode "$T_BENCH" --stdout "$OUT/logs/4-decode.out" nmt-bench decode --checkpoint "$MODEL" --data-dir "$DATA_DIR" \
  --sentences "$BENCH_SENTENCES" --batch-sizes "$BENCH_BATCHES" --modes greedy,beam --engines "$BENCH_ENGINES" \
  --threads "$THREADS" --cache-dir "$OUT/decode/cache" --out "$OUT/decode" --sgemm-size 256 --no-parity --force \
  "${extra[@]}"
for f in decode.json decode.md; do [ -s "$OUT/decode/$f" ] || fail "nmt-bench decode wrote no $f"; done
ok "$(json "$OUT/decode/decode.json" 'len(d["decode"])') rows, engines $(json "$OUT/decode/decode.json" '", ".join(d["engines"])') ($OUT/decode/decode.md)"
mapfile -t rows < <(python scripts/gpu_check.py bench-summary "$OUT/decode/decode.json")
SUMMARY+=("${rows[@]}")
[ -z "$gpu_note" ] || SUMMARY+=("  NOTE: $gpu_note")

STEP=5 STEP_NAME=summary
write_summary OK
