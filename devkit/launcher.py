"""Start the real server: ``embedserve serve`` on a free loopback port, wait for
``/health``, stop it with SIGTERM (SIGKILL past a bound).

The one launcher of the tests, the benchmark (`bench`), the Locust runner (`loadtests.run`)
and `scripts/loopcpu.py`. Every wait is bounded. The server's stdout and stderr go to a log
file whose tail is put into every failure message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MANIFEST_FILE = "embedserve.json"

# Every environment name a setting reads (``NAME`` and ``EMBEDSERVE_NAME``); inherited values
# are dropped so that a developer's shell cannot change what a test or benchmark measures.
_SETTING_PREFIX = "EMBEDSERVE_"


class ServerError(RuntimeError):
    """The server did not start, died, or did not stop in time; the message has its log."""


def models_dir() -> Path:
    """The models directory: ``$MODELS_DIR`` or ``<repo>/models``."""
    return Path(os.environ.get("MODELS_DIR") or ROOT / "models").resolve()


def model_manifest(name: str = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Path of `name`'s manifest under the models directory (it may not exist)."""
    return (root or models_dir()) / name / MANIFEST_FILE


def python_executable() -> str:
    """The repo's ``.venv`` interpreter when there is one, else the running interpreter."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def embedserve_command(module: str = "embedserve") -> list[str]:
    """``python -m MODULE``: what `running_server` runs, before ``serve --host H --port P``."""
    return [python_executable(), "-m", module]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _setting_names() -> set[str]:
    # Imported here: `scripts/loopcpu.py` imports this module before it puts the tree it
    # measures on sys.path, and that tree's embedserve is the one its server must run.
    from embedserve.settings import Settings

    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(choice for choice in choices if isinstance(choice, str))
    return names


def server_env(
    overrides: Mapping[str, str] | None = None, *, inherit_settings: bool = False
) -> dict[str, str]:
    """The child's environment: ours without any embedserve setting plus the defaults below,
    then `overrides`. With `inherit_settings`, ours as it is (a developer's settings apply),
    then `overrides`."""
    if inherit_settings:
        env = dict(os.environ)
    else:
        names = _setting_names()
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in names and not key.startswith(_SETTING_PREFIX)
        }
        env.update(
            {
                "MODELS_DIR": str(models_dir()),
                "REQUIRED_MODELS": DEFAULT_MODEL,
                "OFFLINE": "true",
                "HF_HUB_OFFLINE": "1",
                "LOG_LEVEL": "INFO",
            }
        )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


class ServerProcess:
    """One running server subprocess. Owns the process and its log file."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        settings: Mapping[str, str],
    ) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.settings = dict(settings)  # the env settings it was started with, beyond defaults
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail_chars: int | None = None) -> str:
        """What the server wrote to stdout and stderr so far (the last `tail_chars`)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return text if tail_chars is None else text[-tail_chars:]

    def fail(self, reason: str) -> ServerError:
        """A ServerError naming `reason`, the exit status, and the log's tail."""
        status = self.proc.poll()
        return ServerError(
            f"{reason} (pid {self.pid}, port {self.port}, exit status {status}); "
            f"log {self.log_path}:\n{self.log(6000)}"
        )

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the server process (only to it, never to a group)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for exit; its status, or None if still running."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def wait_healthy(self, timeout_s: float) -> None:
        """Return once ``GET /health`` answers 200; raise ServerError if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise self.fail("server exited before it was healthy")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        return
                time.sleep(0.1)
        raise self.fail(f"server not healthy within {timeout_s:g}s")

    def stop(self, term_timeout_s: float = 30.0, kill_timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `term_timeout_s`, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(term_timeout_s) is None:
                self.proc.kill()
                self.wait(kill_timeout_s)
        return self.proc.poll()


def _launch(
    command: Sequence[str],
    port: int,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    settings: Mapping[str, str],
) -> ServerProcess:
    argv = [*command, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("ab") as log:
        # The child holds its own descriptor of the log; ours closes when this block ends.
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the caller's terminal is not the server's
        )
    return ServerProcess(proc, port, log_path, settings)


@contextlib.contextmanager
def running_server(
    env: Mapping[str, str] | None = None,
    *,
    inherit_settings: bool = False,
    command: Sequence[str] | None = None,
    cwd: Path = ROOT,
    log_dir: Path | None = None,
    log_file: Path | None = None,
    startup_timeout_s: float = 90.0,
    stop_timeout_s: float = 40.0,
    attempts: int = 3,
) -> Iterator[ServerProcess]:
    """Start the real server with settings `env` (env names, e.g. ``BATCH_MAX_TEXTS``), wait
    until healthy, yield it, and stop it on exit (SIGTERM, then SIGKILL past the bound).

    The child's environment is `server_env(env, inherit_settings=...)`. `command` is what
    runs before ``serve --host 127.0.0.1 --port N`` (default `embedserve_command()`;
    ``embedserve_command("tests.faultserver")`` injects faults), from `cwd`.

    A port taken between choosing and binding it is retried up to `attempts` times. Raises
    ServerError with the log's tail when the server does not become healthy. The log is
    `log_file` (appended to, kept), else ``server-PORT.log`` in `log_dir` (kept) or in a
    temporary directory removed after a clean stop.
    """
    own_dir = log_dir is None and log_file is None
    directory = Path(tempfile.mkdtemp(prefix="embedserve-server-")) if own_dir else log_dir
    child_env = server_env(env, inherit_settings=inherit_settings)
    argv = list(command) if command is not None else embedserve_command()
    server: ServerProcess | None = None
    clean = False
    try:
        for attempt in range(1, attempts + 1):
            port = free_port()
            if log_file is not None:
                log_path = log_file
            else:
                assert directory is not None
                log_path = directory / f"server-{port}.log"
            server = _launch(argv, port, child_env, cwd, log_path, env or {})
            try:
                server.wait_healthy(startup_timeout_s)
                break
            except ServerError:
                server.stop(5.0, 5.0)
                if attempt < attempts and "address already in use" in server.log().lower():
                    continue
                raise
        assert server is not None
        yield server
        clean = True
    finally:
        if server is not None:
            status = server.stop(stop_timeout_s)
            if server.proc.poll() is None:
                raise server.fail("server did not exit after SIGKILL")
            clean = clean and status in (0, -signal.SIGTERM)
        if own_dir and clean and directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
