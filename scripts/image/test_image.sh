#!/usr/bin/env bash
# `make test-image`: the container image built and run for real (docs/development.md,
# "Testing the container image").
# Each step is a script of its own in this directory, run in this order:
#
#   engine.sh start      a Docker engine (installed and started when missing)
#   base_images.sh       python:3.11-slim and the compose file's nginx: pulled, or stand-ins
#   build.sh             docker build, timed
#   check_image.sh       the README's `docker run --read-only ...`, and its checks
#   check_compose.sh     compose: nginx in front of 2 replicas
#   engine.sh stop       (at the end, also on failure) only if this run started the engine
#
# No engine (no permission, no kernel support): says so and exits 1, or 0 with
# SKIP_IMAGE_TEST=1. The built image and the base images stay (the next run reuses them).
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=scripts/image
start_s=$(date +%s)

if ! "$dir/engine.sh" start; then
    if [ "${SKIP_IMAGE_TEST:-}" = 1 ]; then
        echo "test-image: SKIPPED: no Docker engine could be started here (SKIP_IMAGE_TEST=1)"
        exit 0
    fi
    echo "test-image: FAILED: no Docker engine could be started here; the image was not"
    echo "test-image: built or run. Set SKIP_IMAGE_TEST=1 to skip on a machine without one."
    exit 1
fi
trap '"$dir/engine.sh" stop' EXIT

"$dir/base_images.sh"
"$dir/build.sh"
"$dir/check_image.sh"
"$dir/check_compose.sh"
echo "test-image: passed in $(($(date +%s) - start_s)) s"
