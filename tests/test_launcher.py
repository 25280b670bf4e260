"""devkit's server launcher (`devkit.launcher`) with a stand-in server: a few lines of Python
that answer ``/health``, so start, readiness, failure, retry and stop are tested without the
model."""

from __future__ import annotations

import signal
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from setuptools import find_packages

from devkit import launcher
from devkit.launcher import ROOT, ServerError, running_server, server_env

# Takes ``serve --host H --port P`` as embedserve does; prints its environment's SETTING.
STAND_IN = """
import http.server, os, sys
host, port = sys.argv[3], int(sys.argv[5])
print("SETTING=" + os.environ.get("BATCH_MAX_TEXTS", "-"), flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, port), Health).serve_forever()
"""


def stand_in(script: str = STAND_IN) -> list[str]:
    return [sys.executable, "-c", script]


def test_server_env_drops_inherited_settings_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCH_MAX_TEXTS", "7")
    monkeypatch.setenv("EMBEDSERVE_API_KEYS", "secret")
    monkeypatch.setenv("UNRELATED", "kept")
    env = server_env({"ENABLE_BATCHING": "false"})
    assert "BATCH_MAX_TEXTS" not in env and "EMBEDSERVE_API_KEYS" not in env
    assert env["UNRELATED"] == "kept" and env["ENABLE_BATCHING"] == "false"
    assert env["OFFLINE"] == "true" and env["PYTHONUNBUFFERED"] == "1"
    inherited = server_env({"ENABLE_BATCHING": "false"}, inherit_settings=True)
    assert inherited["BATCH_MAX_TEXTS"] == "7" and inherited["ENABLE_BATCHING"] == "false"


def test_starts_waits_until_healthy_and_stops(tmp_path: Path) -> None:
    with running_server({"BATCH_MAX_TEXTS": "3"}, command=stand_in(), log_dir=tmp_path) as server:
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        assert server.settings == {"BATCH_MAX_TEXTS": "3"}
        proc = server.proc
    assert proc.returncode == -signal.SIGTERM  # stopped on exit
    assert "SETTING=3" in server.log()
    assert server.log_path.parent == tmp_path  # kept in the caller's directory


def test_a_temporary_log_directory_goes_after_a_clean_stop() -> None:
    with running_server(command=stand_in()) as server:
        directory = server.log_path.parent
        assert directory.is_dir()
    assert not directory.exists()


def test_a_server_that_exits_raises_with_its_log(tmp_path: Path) -> None:
    failing = stand_in("import sys; print('no model here', flush=True); sys.exit(3)")
    with (
        pytest.raises(ServerError, match="exited before it was healthy") as caught,
        running_server(command=failing, log_dir=tmp_path, attempts=1),
    ):
        pytest.fail("yielded a server that never started")
    assert "exit status 3" in str(caught.value) and "no model here" in str(caught.value)


def test_a_taken_port_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first attempt fails as a lost race for the port does; the second starts.
    marker = tmp_path / "tried"
    flaky = (
        "import os, sys, pathlib\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.touch(); print('[Errno 98] address already in use', flush=True); sys.exit(1)\n"
        + STAND_IN
    )
    ports = iter([launcher.free_port(), launcher.free_port()])
    monkeypatch.setattr(launcher, "free_port", lambda: next(ports))
    log_file = tmp_path / "server.log"
    with running_server(command=stand_in(flaky), log_file=log_file) as server:
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    assert log_file.read_text().count("address already in use") == 1  # one file, appended


def test_devkit_stays_out_of_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = find_packages(where=str(ROOT), include=include)
    assert "embedserve" in shipped
    assert not [name for name in shipped if name.split(".")[0] != "embedserve"], shipped
