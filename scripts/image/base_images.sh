#!/usr/bin/env bash
# The base images the Dockerfile and docker-compose.yml name: pulled when the registry
# answers, otherwise local stand-ins made from Debian packages (debootstrap) and tagged with
# the same names. An image that is already there (pulled, or a stand-in made by an earlier
# run) is kept as it is: a stand-in never overwrites a pulled image.
#
#   scripts/image/base_images.sh      # prints, per image, which base is used
#
# Stand-ins: Debian bookworm `--variant=minbase` from the mirror apt uses here;
#   python:3.11-slim   python3 (3.11) python3-venv python3-pip python-is-python3 ca-certificates,
#                      plus the machine's pip configuration and CA bundle, so that pip in
#                      the build reaches the same PyPI mirror through the same proxy;
#   nginx:1.27-alpine  Debian's nginx, started as the official image starts it.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON_IMAGE=python:3.11-slim
NGINX_IMAGE=$(sed -n 's/^ *image: \(nginx:.*\)$/\1/p' docker-compose.yml)
WORK=build/image/rootfs
SUITE=bookworm
# The first Debian mirror apt is configured with (deb822 or one-line format).
MIRROR=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p; s/^deb \(http[^ ]*debian\)\/* .*/\1/p' \
    | head -n 1 || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# pip's own configuration files on this machine (global and site), copied into the
# python stand-in at the same paths; the CA bundle they name comes along.
PIP_CONFIG_FILES=(/etc/pip.conf /etc/xdg/pip)

unmount_under() {  # what an interrupted debootstrap left mounted (proc, sys) under DIR
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r \
        | while read -r mount; do umount -l "$mount"; done
}

debootstrap_root() {  # debootstrap_root DIR PACKAGES
    local dir=$1 packages=$2
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    unmount_under "$dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "base_images: debootstrap $SUITE ($MIRROR) with $packages into $dir"
    nice -n 10 debootstrap --variant=minbase --include="$packages" "$SUITE" "$dir" "$MIRROR" \
        >"$dir.log" 2>&1 || { tail -n 20 "$dir.log"; return 1; }
    # What slim images drop: apt lists and caches, docs.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin \
        "$dir"/var/cache/apt/archives/*.deb "$dir"/usr/share/doc/* "$dir"/usr/share/man/*
}

import_root() {  # import_root DIR TAG CMD_JSON
    local dir=$1 tag=$2 cmd=$3
    unmount_under "$dir"
    tar -C "$dir" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c "CMD $cmd" \
        -m "embedserve stand-in for $tag: Debian $SUITE minbase (scripts/image/base_images.sh)" \
        - "$tag" >/dev/null
    rm -rf "$dir" "$dir.log"
}

make_python_standin() {
    local dir=$WORK/python
    debootstrap_root "$dir" python3,python3-venv,python3-pip,python-is-python3,ca-certificates
    for path in "${PIP_CONFIG_FILES[@]}"; do
        if [ -e "$path" ]; then
            mkdir -p "$dir$(dirname "$path")"
            cp -a "$path" "$dir$(dirname "$path")/"
        fi
    done
    # The CA bundles pip's `cert` names (this machine's, with its proxy's CA), over Debian's.
    for cert in ${PIP_CERT:-} $(cat /etc/pip.conf /etc/xdg/pip/pip.conf 2>/dev/null \
        | sed -n 's/^ *cert *= *//p' || true); do
        if [ -f "$cert" ]; then
            mkdir -p "$dir$(dirname "$cert")"
            cp -L "$cert" "$dir$cert"
        fi
    done
    import_root "$dir" "$PYTHON_IMAGE" '["python3"]'
}

make_nginx_standin() {
    local dir=$WORK/nginx
    debootstrap_root "$dir" nginx,ca-certificates
    import_root "$dir" "$NGINX_IMAGE" '["nginx", "-g", "daemon off;"]'
}

ensure() {  # ensure TAG MAKER
    local tag=$1 maker=$2 comment
    if docker image inspect "$tag" >/dev/null 2>&1; then
        comment=$(docker image inspect -f '{{.Comment}}' "$tag")
        case $comment in
            "embedserve stand-in"*) echo "base_images: $tag: local stand-in (cached)" ;;
            *) echo "base_images: $tag: pulled image already present" ;;
        esac
    elif timeout 120 docker pull -q "$tag" >/dev/null 2>&1; then
        echo "base_images: $tag: pulled from the registry"
    else
        echo "base_images: $tag cannot be pulled; making a local stand-in from Debian packages"
        start=$(date +%s)
        "$maker"
        echo "base_images: $tag: local stand-in made in $(($(date +%s) - start)) s"
    fi
}

ensure "$PYTHON_IMAGE" make_python_standin
ensure "$NGINX_IMAGE" make_nginx_standin
