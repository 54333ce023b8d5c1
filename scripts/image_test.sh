#!/usr/bin/env bash
# Build the CPU image with buildah and run the server inside it (`make image-test`).
#
# Works without a Docker engine: `buildah bud` builds the Dockerfile and `buildah run --isolation
# chroot` runs nmt-serve in a working container on the host network. The test then checks, from
# the host: gRPC health SERVING, a translation, model info, /metrics, the image's own HEALTHCHECK
# command, a non-root user and no torch inside, and exit code 0 on SIGTERM. It prints the image
# size and the build time, and removes its container, the builder stage's images (label
# nmt.stage=builder: torch and the exporter, ~1.7 GB) and the image the tag pointed to before.
#
# Needs buildah and a local python:3.11-slim (on a machine that cannot pull it, run
# ../shared/tools/container-base first; this script does when the tool is there).
# Env: IMAGE (default nmt:local), BIN (host venv bin, default .venv/bin), BUILDAH_FLAGS (e.g. --no-cache),
# START_TIMEOUT (seconds to SERVING, default 180), TORCH_WHEEL_DIR (a directory
# holding a torch CPU wheel to build with when download.pytorch.org is out of reach; default /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-nmt:local}
BIN=${BIN:-.venv/bin}
BASE=docker.io/library/python:3.11-slim
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
START_TIMEOUT=${START_TIMEOUT:-180}
CONTAINER=nmt-image-test-$$
say() { printf '\n== %s\n' "$*"; }
fail() { printf 'image-test: FAIL: %s\n' "$*" >&2; exit 1; }

command -v buildah >/dev/null || fail "buildah is not installed (apt-get install buildah)"
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  tool=../shared/tools/container-base
  [ -x "$tool" ] || fail "no local $BASE image and no $tool to build one"
  say "building the base image $BASE"
  "$tool" "$BASE"
fi

# A local torch CPU wheel goes into the build context (build/wheels/, git-ignored); else the
# Dockerfile downloads one from TORCH_INDEX_URL.
wheel=$(ls "$TORCH_WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && [ ! -f "build/wheels/$(basename "$wheel")" ]; then
  mkdir -p build/wheels
  ln -f "$wheel" build/wheels/ 2>/dev/null || cp "$wheel" build/wheels/
fi

# --layers caches each step as an image; the builder stage's (torch, the exporter: ~1.7 GB) are not
# needed once the bundle is in the runtime image, and go whether the build passed or failed. The
# runtime stage's share their layers with $IMAGE.
builder_images() { buildah images --all --noheading --format '{{.ID}}' --filter label=nmt.stage=builder | sort -u; }
remove_builder_images() {
  local before ids id
  before=$(builder_images | wc -l)
  for _ in $(seq 30); do  # children before parents: an image another one builds on is refused until then
    ids=$(builder_images)
    [ -n "$ids" ] || break
    for id in $ids; do buildah rmi "$id" >/dev/null 2>&1 || true; done
  done
  echo "removed $(( before - $(builder_images | wc -l) )) builder stage images"
}
trap remove_builder_images EXIT

say "buildah bud -t $IMAGE"
previous=$(buildah images --noheading --format '{{.ID}}' "$IMAGE" 2>/dev/null || true)
started=$(date +%s)
# shellcheck disable=SC2086 # BUILDAH_FLAGS: extra words, e.g. --no-cache
buildah bud --isolation chroot --pull=never --format docker --layers --force-rm ${BUILDAH_FLAGS:-} -t "$IMAGE" .
build_seconds=$(( $(date +%s) - started ))
remove_builder_images
current=$(buildah images --noheading --format '{{.ID}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  buildah rmi "$previous" >/dev/null 2>&1 && echo "removed the previous $IMAGE ($previous)" || true
fi

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS_PORT=$(free_port)
[ "$PORT" != "$METRICS_PORT" ] || METRICS_PORT=$(free_port)
TARGET=127.0.0.1:$PORT
server_pid=""  # buildah run, whose descendant is nmt-serve
# buildah run does not forward signals, so the script signals nmt-serve itself.
descendants() { local p; for p in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$p"; descendants "$p"; done; }
serve_pid() {  # the Python process, not buildah-chroot-exec (whose arguments name nmt-serve too)
  local p
  for p in $(descendants "$server_pid"); do
    if tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | grep -Eq '^[^ ]*python[0-9.]* [^ ]*bin/nmt-serve'; then
      echo "$p"; return
    fi
  done
}
cleanup() {
  remove_builder_images >/dev/null
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    pid=$(serve_pid)
    [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  buildah rm "$CONTAINER" >/dev/null 2>&1 || echo "image-test: could not remove container $CONTAINER" >&2
}
trap cleanup EXIT

buildah from --pull=never --name "$CONTAINER" "$IMAGE" >/dev/null
in_container() { buildah run --isolation chroot "$CONTAINER" -- "$@"; }

say "checks inside the image"
uid=$(in_container id -u)
[ "$uid" != 0 ] || fail "the image runs as root"
in_container python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
  || fail "torch is installed in the runtime image"
in_container nmt-serve --help >/dev/null
echo "user id $uid, no torch, nmt-serve --help works"

say "nmt-serve in the container on 127.0.0.1:$PORT (metrics $METRICS_PORT)"
log=$(mktemp)
buildah run --isolation chroot "$CONTAINER" -- \
  nmt-serve --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" >"$log" 2>&1 &
server_pid=$!
deadline=$(( $(date +%s) + START_TIMEOUT ))
until [ "$("$BIN/nmt-client" health --target "$TARGET" --deadline 2 2>/dev/null)" = SERVING ]; do
  kill -0 "$server_pid" 2>/dev/null || { cat "$log"; fail "nmt-serve exited before SERVING"; }
  [ "$(date +%s)" -lt "$deadline" ] || { cat "$log"; fail "not SERVING after ${START_TIMEOUT}s"; }
  sleep 1
done
echo "SERVING after $(( $(date +%s) - deadline + START_TIMEOUT ))s"

say "gRPC calls from the host"
out=$("$BIN/nmt-client" translate --target "$TARGET" "A man rides a bike." "Two dogs play in the snow.")
echo "$out"
[ "$(printf '%s\n' "$out" | grep -c .)" = 2 ] || fail "expected two translations"
"$BIN/nmt-client" info --target "$TARGET" | grep -E '^(name|precision|provider):'
models=$("$BIN/nmt-client" models list --target "$TARGET")
echo "$models"
for model in en-de en-fr; do
  printf '%s\n' "$models" | grep -q "^$model\b.*READY" || fail "the image's repository does not serve $model"
done
out=$("$BIN/nmt-client" translate --target "$TARGET" --model en-fr "A man rides a bike.")
echo "$out"
[ -n "$out" ] || fail "expected a French translation"

say "the image's HEALTHCHECK command (exec form), run inside the container"
mapfile -t check < <(buildah inspect --type image "$IMAGE" | "$BIN/python" -c \
  'import json, sys; t = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]; assert t[0] == "CMD", t; print("\n".join(t[1:]))')
echo "${check[*]}"
buildah run --isolation chroot --env NMT_PORT="$PORT" "$CONTAINER" -- "${check[@]}" \
  || fail "the HEALTHCHECK command failed"

say "/metrics"
metrics=$(curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics")
printf '%s\n' "$metrics" | grep -E '^nmt_requests_total\{.*method="Translate"' || fail "no nmt_requests_total"
printf '%s\n' "$metrics" | grep -E '^(nmt_batch_sentences_count|process_resident_memory_bytes) '

say "SIGTERM"
pid=$(serve_pid)
[ -n "$pid" ] || fail "cannot find the nmt-serve process under buildah run (pid $server_pid)"
kill -TERM "$pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=""
tail -n 3 "$log"
[ "$rc" = 0 ] || fail "nmt-serve exited with $rc on SIGTERM"
echo "exit code 0 after SIGTERM"

size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)
left=$(builder_images | wc -l)
[ "$left" = 0 ] || fail "$left builder stage images are left"
say "image-test: OK: $IMAGE, size $size, build ${build_seconds}s, no builder images left"
