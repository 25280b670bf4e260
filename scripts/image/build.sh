#!/usr/bin/env bash
# Builds the embedserve image (tag: $IMAGE, default embedserve) from the Dockerfile, timed,
# with the build arguments this machine needs:
#
# - When the torch pin of requirements-build.txt lies as a wheel in a directory pip's
#   find-links names (this kind of machine: a CPU wheel in /opt/wheels, and PyTorch's
#   index unreachable), that directory is served on loopback for the build, which runs with
#   --network host: PIP_FIND_LINKS points there and TORCH_INDEX_URL at the index pip uses
#   here. pip then takes the local CPU wheel (torch==X is satisfied by X+cpu).
# - Otherwise the Dockerfile's defaults (PyTorch's CPU index).
#
# Writes the build time to build/image/build_s.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-embedserve}
mkdir -p build/image

torch_pin=$(sed -n 's/^torch==\([^ ]*\)$/\1/p' requirements-build.txt)
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
index=${index:-https://pypi.org/simple}
find_links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}

wheel_dir=""
for dir in $find_links; do
    if compgen -G "$dir/torch-${torch_pin}[-+]*.whl" >/dev/null; then
        wheel_dir=$dir
        break
    fi
done

args=()
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ -n "$wheel_dir" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$wheel_dir" "$port" \
        >build/image/wheel-server.log 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
        if python3 -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$port/', timeout=1)" \
            2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "build: torch==$torch_pin from $wheel_dir (served on 127.0.0.1:$port), the rest from $index"
    args=(--network host
        --build-arg "TORCH_INDEX_URL=$index"
        --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
else
    echo "build: no local torch==$torch_pin wheel; the Dockerfile's default TORCH_INDEX_URL"
fi

start=$(date +%s)
# The classic builder: Debian's docker.io has no buildx; the steps are the same.
DOCKER_BUILDKIT=0 docker build --tag "$IMAGE" "${args[@]}" . >build/image/build.log 2>&1 \
    || { tail -n 40 build/image/build.log; echo "build: docker build failed"; exit 1; }
build_s=$(($(date +%s) - start))
echo "$build_s" >build/image/build_s
echo "build: $IMAGE built in ${build_s} s ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
