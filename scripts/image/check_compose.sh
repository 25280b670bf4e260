#!/usr/bin/env bash
# docker-compose.yml for real, with the built image ($IMAGE must be embedserve:latest, the
# compose file's `image:`): nginx in front of 2 replicas of embedserve, published on a free
# loopback port only. Checks that requests through nginx reach both replicas, then that
# `stop` ends every container cleanly (exit 0, within stop_grace_period). Removes the
# project's containers, network and volumes, also when a check fails.
#
# Compose: the `docker compose` plugin when there is one, else Debian's docker-compose
# (installed when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
PROJECT=embedserve-test-compose-$$
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    if ! command -v docker-compose >/dev/null; then
        echo "check_compose: installing Debian's docker-compose"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
            docker-compose >/dev/null
    fi
    compose=(docker-compose)
fi
echo "check_compose: ${compose[*]} $("${compose[@]}" version --short), project $PROJECT"
compose+=(--project-name "$PROJECT" --file docker-compose.yml)
# nginx's published port, on loopback only ("127.0.0.1:PORT:8000").
export EMBEDSERVE_PORT=127.0.0.1:$PORT
containers() {  # the project's containers (of service $1 if given), running or not
    docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
        ${1:+--filter "label=com.docker.compose.service=$1"}
}

cleanup() {
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
}
trap cleanup EXIT

fail() {
    echo "check_compose: FAILED: $*"
    "${compose[@]}" ps || true
    "${compose[@]}" logs --tail 20 || true
    exit 1
}

start_ns=$(date +%s%N)
# up waits for the replicas' health (nginx depends on service_healthy).
"${compose[@]}" up -d --no-build --scale embedserve=2 >/dev/null 2>&1 || fail "compose up"
mapfile -t replicas < <(containers embedserve)
[ "${#replicas[@]}" -eq 2 ] || fail "${#replicas[@]} replicas running, not 2"
# nginx resolves `embedserve` when it starts; both replicas were up by then, but a reload
# is what docs/deployment.md advises after a scale change, so do it as a user would.
"${compose[@]}" exec -T nginx nginx -s reload >/dev/null 2>&1 || fail "nginx -s reload"
for _ in $(seq 50); do
    python3 -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
        2>/dev/null && break
    sleep 0.2
done
echo "up: nginx and 2 healthy replicas in $((($(date +%s%N) - start_ns) / 1000000000)) s"

names=()
for id in "${replicas[@]}"; do names+=("$(docker inspect -f '{{.Name}}' "$id" | tr -d /)"); done
"$PYTHON" scripts/image/checks.py spread "http://127.0.0.1:$PORT" "${names[@]}" \
    || fail "requests did not reach both replicas"

start_ns=$(date +%s%N)
"${compose[@]}" stop >/dev/null 2>&1 || fail "compose stop"
stop_s=$((($(date +%s%N) - start_ns) / 1000000000))
codes=$(for id in $(containers); do docker inspect -f '{{.Name}}={{.State.ExitCode}}' "$id"; done)
echo "stop: $stop_s s; exit codes: $(echo "$codes" | tr -d / | tr '\n' ' ')"
if echo "$codes" | grep -qv '=0$'; then fail "a container did not exit 0"; fi
