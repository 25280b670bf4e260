#!/usr/bin/env bash
# A Docker engine for `make test-image`.
#
#   scripts/image/engine.sh start   # engine answering, or exit 1 with the reason
#   scripts/image/engine.sh stop    # stops dockerd only if `start` started it
#
# start: uses a running engine as it is; otherwise installs Debian's docker.io when dockerd
# is missing (apt-get, as root), starts dockerd in the background (nice 10: the build and
# the containers inherit it, the machine is shared) and waits for it. The pid of a dockerd
# it started goes to build/image/dockerd.pid, which is what `stop` stops.
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE=build/image
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log

start() {
    if docker info >/dev/null 2>&1; then
        echo "engine: a Docker engine is already running (left running at the end)"
        return 0
    fi
    if ! command -v dockerd >/dev/null; then
        if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
            echo "engine: no dockerd, and no apt-get as root to install docker.io"
            return 1
        fi
        echo "engine: installing Debian's docker.io"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
            docker.io >/dev/null
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "engine: dockerd is not running and starting it needs root"
        return 1
    fi
    mkdir -p "$STATE"
    setsid nice -n 10 dockerd >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then
            echo "engine: started dockerd (pid $(cat "$PIDFILE"), log $LOG)"
            return 0
        fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
        sleep 1
    done
    echo "engine: dockerd did not start; the end of $LOG:"
    tail -n 15 "$LOG"
    stop
    return 1
}

stop() {
    [ -f "$PIDFILE" ] || return 0
    pid=$(cat "$PIDFILE")
    rm -f "$PIDFILE"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || { echo "engine: stopped dockerd (pid $pid)"; return 0; }
        sleep 1
    done
    echo "engine: dockerd (pid $pid) still running 30 s after SIGTERM"
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
