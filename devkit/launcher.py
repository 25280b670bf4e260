"""Drive the real server: start ``python -m embedserve serve`` on a free loopback port, wait
for ``/health``, stop it with SIGTERM (SIGKILL past a bound); plus deterministic texts.

Used by the integration tests and by ``scripts/quickbench.py``. Every wait is bounded. The
server's stdout and stderr go to a log file whose tail is put into every failure message.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MANIFEST_FILE = "embedserve.json"

# Every environment name a setting reads (``NAME`` and ``EMBEDSERVE_NAME``); inherited values
# are dropped so that a developer's shell cannot change what a test or benchmark measures.
_SETTING_PREFIX = "EMBEDSERVE_"


class ServerError(RuntimeError):
    """The server did not start, died, or did not stop in time; the message has its log."""


def models_dir() -> Path:
    """The models directory the tests use: ``$MODELS_DIR`` or ``<repo>/models``."""
    return Path(os.environ.get("MODELS_DIR") or ROOT / "models").resolve()


def model_manifest(name: str = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Path of `name`'s manifest under the models directory (it may not exist)."""
    return (root or models_dir()) / name / MANIFEST_FILE


def require_exported_model(name: str = DEFAULT_MODEL) -> Path:
    """The imported model's directory. Skips the test without it, or fails it when
    EMBEDSERVE_REQUIRE_MODEL is set (as `make test` and CI do), so CI never skips silently.
    """
    manifest = model_manifest(name)
    if not manifest.is_file():
        reason = (
            f"no exported model at {manifest.parent} (run `make model`, or point MODELS_DIR "
            "at a models directory)"
        )
        if os.environ.get("EMBEDSERVE_REQUIRE_MODEL"):
            pytest.fail(f"EMBEDSERVE_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    return manifest.parent


def python_executable() -> str:
    """The repo's ``.venv`` interpreter when there is one, else the running interpreter."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _setting_names() -> set[str]:
    from embedserve.settings import Settings

    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(choice for choice in choices if isinstance(choice, str))
    return names


def server_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours without any embedserve setting, then `overrides`."""
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
            "PYTHONUNBUFFERED": "1",
        }
    )
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
    port: int,
    env: Mapping[str, str],
    log_path: Path,
    settings: Mapping[str, str],
    module: str = "embedserve",
) -> ServerProcess:
    command = [
        python_executable(),
        "-m",
        module,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        # The child holds its own descriptor of the log; ours closes when this block ends.
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the test's terminal is not the server's
        )
    return ServerProcess(proc, port, log_path, settings)


@contextlib.contextmanager
def running_server(
    env: Mapping[str, str] | None = None,
    *,
    log_dir: Path | None = None,
    startup_timeout_s: float = 90.0,
    stop_timeout_s: float = 40.0,
    attempts: int = 3,
    module: str = "embedserve",
) -> Iterator[ServerProcess]:
    """Start the real server with settings `env` (env names, e.g. ``BATCH_MAX_TEXTS``), wait
    until healthy, yield it, and stop it on exit (SIGTERM, then SIGKILL past the bound).
    `module` is run as ``python -m MODULE serve`` (``tests.faultserver`` injects faults).

    A port taken between choosing and binding it is retried up to `attempts` times. Raises
    ServerError with the log's tail when the server does not become healthy. The log lives
    in `log_dir` (kept), or in a temporary directory removed after a clean stop.
    """
    own_dir = log_dir is None
    directory = Path(tempfile.mkdtemp(prefix="embedserve-server-")) if own_dir else log_dir
    assert directory is not None
    child_env = server_env(env)
    server: ServerProcess | None = None
    clean = False
    try:
        for attempt in range(1, attempts + 1):
            port = free_port()
            log_path = directory / f"server-{port}.log"
            server = _launch(port, child_env, log_path, env or {}, module)
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
        if own_dir and clean:
            shutil.rmtree(directory, ignore_errors=True)


# -- deterministic texts -------------------------------------------------------------------
_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her it an are were be this "
    "which or had not but have they one their has been its all would more new after who also "
    "two other first when there some into time over year city river music school county war "
    "team game party family world system company state house church album film station "
    "village series season member north south water light power market history model data "
    "network energy garden winter summer morning evening coffee bread window mountain forest "
    "ocean island bridge engine signal memory paper letter story language science number "
    "question answer reason method result theory value process design field report policy "
    "health travel kitchen doctor teacher student library museum harbor festival concert "
    "quickly slowly carefully brightly quietly gently strongly early late often never always "
    "red blue green yellow silver golden ancient modern tiny enormous bright dark warm cold "
    "build carry write read open close begin finish grow change measure follow explain "
    "discover protect remember travel compare improve prepare describe"
)
_WORDS = tuple(_VOCABULARY.split())


def words(rng: random.Random, count: int) -> str:
    """`count` words drawn from a fixed vocabulary, as one sentence."""
    return " ".join(rng.choice(_WORDS) for _ in range(count)).capitalize() + "."


def _unique(rng: random.Random, counts: list[int]) -> list[str]:
    seen: set[str] = set()
    texts: list[str] = []
    for count in counts:
        for _ in range(100):  # a repeat needs the same words in the same order: rare
            text = words(rng, count)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a unique {count}-word text")
        seen.add(text)
        texts.append(text)
    return texts


def spread_texts(count: int, *, seed: int, min_words: int = 2, max_words: int = 200) -> list[str]:
    """`count` distinct texts whose word counts are log-uniform over [min_words, max_words],
    shuffled, with both extremes present."""
    rng = random.Random(seed)
    low, high = math.log(min_words), math.log(max_words)
    counts = [round(math.exp(rng.uniform(low, high))) for _ in range(count)]
    counts[0], counts[-1] = min_words, max_words
    rng.shuffle(counts)
    return _unique(rng, counts)


def long_tailed_texts(
    count: int, *, seed: int, median_words: float = 14.0, tail_share: float = 0.08
) -> list[str]:
    """`count` distinct texts: most lognormal around `median_words` words (about 20 tokens),
    a `tail_share` of them 80-260 words (past a 256-token limit at the top)."""
    rng = random.Random(seed)
    counts: list[int] = []
    for _ in range(count):
        if rng.random() < tail_share:
            counts.append(rng.randint(80, 260))
        else:
            counts.append(max(2, min(120, round(rng.lognormvariate(math.log(median_words), 0.6)))))
    return _unique(rng, counts)


def uniform_texts(count: int, *, seed: int, min_words: int = 10, max_words: int = 20) -> list[str]:
    """`count` distinct texts of `min_words`..`max_words` words, uniformly."""
    rng = random.Random(seed)
    return _unique(rng, [rng.randint(min_words, max_words) for _ in range(count)])
