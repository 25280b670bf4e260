"""Render ``config/nginx.conf`` for loopback upstreams and run nginx as a subprocess.

Independent of embedserve: used by tests/test_compose.py (``nginx -t``) and
tests/test_nginx_failover.py. Everything nginx writes (pid, logs, temp files) lives under a
prefix directory the caller owns. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "config" / "nginx.conf"
DEBIAN_NGINX = Path("/usr/sbin/nginx")

_SERVERS = re.compile(
    r"^(?P<indent>[ \t]*)# BEGIN SERVERS\n(?P<body>.*?)^[ \t]*# END SERVERS\n",
    re.MULTILINE | re.DOTALL,
)
_SERVER_LINE = re.compile(r"^\s*server\s+(?P<address>\S+)(?P<params>[^;]*);\s*$")
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen\s+8000;", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxError(RuntimeError):
    """nginx rejected the configuration, died, or did not start or stop in time."""


def nginx_binary() -> str | None:
    """The nginx executable (on PATH, or Debian's /usr/sbin/nginx), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return str(DEBIAN_NGINX) if DEBIAN_NGINX.is_file() else None


def render(
    upstreams: Sequence[str],
    listen_port: int,
    prefix: Path,
    template: Path = NGINX_CONF,
) -> str:
    """`template` with one upstream server line per ``host:port`` in `upstreams` (keeping the
    template's parameters), ``listen 127.0.0.1:listen_port``, and every path under `prefix`.
    Raises ValueError when the template lacks a part this relies on.
    """
    if not upstreams:
        raise ValueError("no upstream servers")
    text = template.read_text()
    block = _SERVERS.search(text)
    if block is None:
        raise ValueError(f"{template}: no '# BEGIN SERVERS' ... '# END SERVERS' block")
    lines = [line for line in block["body"].splitlines() if line.strip()]
    match = _SERVER_LINE.match(lines[0]) if len(lines) == 1 else None
    if match is None:
        raise ValueError(f"{template}: expected one 'server ...;' line between the markers")
    indent = block["indent"]
    servers = "".join(f"{indent}server {addr}{match['params']};\n" for addr in upstreams)
    text = text[: block.start()] + servers + text[block.end() :]

    text, listens = _LISTEN.subn(rf"\g<indent>listen 127.0.0.1:{listen_port};", text)
    if listens != 1:
        raise ValueError(f"{template}: expected exactly one 'listen 8000;' line")
    for needle in ("/var/run/nginx.pid", "/var/log/nginx/", "http {\n"):
        if needle not in text:
            raise ValueError(f"{template}: {needle!r} not found")
    text = text.replace("/var/run/nginx.pid", str(prefix / "nginx.pid"))
    text = text.replace("/var/log/nginx/", f"{prefix / 'logs'}/")
    temp = "".join(f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in _TEMP_PATHS)
    return text.replace("http {\n", "http {\n" + temp, 1)


def write_config(upstreams: Sequence[str], listen_port: int, prefix: Path) -> Path:
    """Render into `prefix` (creating logs/ and temp/ there); the path of the config."""
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(upstreams, listen_port, prefix))
    return conf


def _command(binary: str, prefix: Path, conf: Path) -> list[str]:
    # -e: the error log from the first line on, before the config's error_log is read.
    return [binary, "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf)]


def check_config(binary: str, prefix: Path, conf: Path, timeout_s: float = 30.0) -> str:
    """Run ``nginx -t``; its output. Raises NginxError when nginx rejects `conf`."""
    done = subprocess.run(
        [*_command(binary, prefix, conf), "-t"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise NginxError(f"nginx -t failed ({done.returncode}):\n{output}")
    return output


def error_log(prefix: Path) -> str:
    """The tail of nginx's error log under `prefix`."""
    path = prefix / "logs" / "error.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no error log)"


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_nginx(
    binary: str,
    upstreams: Sequence[str],
    listen_port: int,
    prefix: Path,
    *,
    startup_timeout_s: float = 15.0,
    stop_timeout_s: float = 15.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """nginx in the foreground over `upstreams`, listening on 127.0.0.1:`listen_port`; yields
    once the port accepts connections, and stops it on exit (SIGQUIT: graceful, then SIGKILL
    past `stop_timeout_s`). Raises NginxError with the error log's tail on failure.
    """
    conf = write_config(upstreams, listen_port, prefix)
    check_config(binary, prefix, conf)
    with (prefix / "logs" / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(
            [*_command(binary, prefix, conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _accepts(listen_port):
            if proc.poll() is not None:
                raise NginxError(f"nginx exited ({proc.returncode}):\n{error_log(prefix)}")
            if time.monotonic() > deadline:
                raise NginxError(f"nginx not listening within {startup_timeout_s:g}s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                # Workers outlive a killed master, so kill the session nginx was started in
                # (its own process group: only nginx's processes).
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=stop_timeout_s)
