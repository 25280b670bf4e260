#!/usr/bin/env bash
# Runs the built image ($IMAGE, default embedserve) the way README ("Docker") and
# docs/deployment.md ("Container image") document it, and checks it:
#
#   docker run --read-only -v VOLUME:/models/.cache -p 127.0.0.1:PORT:8000 embedserve
#
# (the README's command, with a fresh named volume and a free loopback port), then
#   size          the image's size, and what it adds to its base
#   no torch      torch and transformers are not importable in the image
#   /health       200, and how long after `docker run`
#   healthy       Docker's own health status (the HEALTHCHECK) turns `healthy`
#   uid           the server (PID 1) runs as UID/GID 10001, not root
#   embedding     /embed and /embed/batch equal the local model's (scripts/image/checks.py)
#   stop          `docker stop -t 40` under load: every accepted request 200, exit 0
#   padded        the same read-only run with ENABLE_PACKING=false (FastEmbed's path, which
#                 failed on a read-only root before) and docs/deployment.md's tmpfs instead of a
#                 volume: /health 200 and the same embeddings
# Removes the containers and the volume it made, also when a check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-embedserve}
PYTHON=${PYTHON:-.venv/bin/python}
NAME=embedserve-test-image-$$
VOLUME=embedserve-test-cache-$$
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT

cleanup() {
    docker rm -f "$NAME" "$NAME-padded" >/dev/null 2>&1 || true
    docker volume rm "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

current=$NAME
fail() {
    echo "check_image: FAILED: $*"
    echo "check_image: the log of $current (last 30 lines):"
    docker logs --tail 30 "$current" 2>&1 || true
    exit 1
}

elapsed() {  # seconds since $start_ns, to a tenth
    local ms=$((($(date +%s%N) - start_ns) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

wait_health_200() {  # until $URL/health answers 200 (60 s), or the container exits
    local status=""
    for _ in $(seq 300); do
        status=$(python3 -c "import urllib.request as r; print(r.urlopen('$URL/health', timeout=2).status)" \
            2>/dev/null || true)
        [ "$status" = 200 ] && return 0
        [ "$(docker inspect -f '{{.State.Running}}' "$current")" = true ] \
            || fail "the container exited with status $(docker inspect -f '{{.State.ExitCode}}' "$current")"
        sleep 0.2
    done
    fail "/health did not answer 200 within 60 s"
}

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' python:3.11-slim)
echo "size: $((size / 1000000)) MB, $(((size - base_size) / 1000000)) MB on top of python:3.11-slim"

probe='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("torch", "transformers")))'
docker run --rm --entrypoint python "$IMAGE" -c "$probe" \
    || fail "torch or transformers importable in the image"
echo "no torch: neither torch nor transformers is importable"

start_ns=$(date +%s%N)
docker run -d --name "$NAME" --read-only -v "$VOLUME:/models/.cache" -p "127.0.0.1:$PORT:8000" \
    "$IMAGE" >/dev/null
wait_health_200
echo "/health: 200, $(elapsed) s after docker run"

health=""
for _ in $(seq 90); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || fail "Docker health status is '$health' after 90 s"
echo "healthy: Docker's health status is healthy, $(elapsed) s after docker run"

ids=$(docker exec "$NAME" python -c "s = open('/proc/1/status').read(); print(s.split('Uid:')[1].split()[0], s.split('Gid:')[1].split()[0])")
[ "$ids" = "10001 10001" ] || fail "PID 1 runs as uid/gid $ids"
echo "uid: the server (PID 1) runs as uid 10001, gid 10001"

"$PYTHON" scripts/image/checks.py embedding "$URL" || fail "embedding"
"$PYTHON" scripts/image/checks.py stop "$URL" "$NAME" --timeout 40 || fail "docker stop under load"

current=$NAME-padded
start_ns=$(date +%s%N)
docker run -d --name "$current" --read-only --tmpfs /models/.cache:uid=10001,gid=10001 \
    -e ENABLE_PACKING=false -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
wait_health_200
echo "padded: ENABLE_PACKING=false, read-only root, tmpfs cache: /health 200 after $(elapsed) s"
"$PYTHON" scripts/image/checks.py embedding "$URL" || fail "embedding (padded)"
docker stop -t 40 "$current" >/dev/null
