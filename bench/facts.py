"""What a run records about its machine and its texts: facts, corpora and their sizes."""

from __future__ import annotations

import importlib
import os
import platform
import resource
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from devkit.procfs import machine_busy_s
from devkit.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
VERSIONED = (
    "embedserve",
    "fastembed",
    "onnxruntime",
    "tokenizers",
    "numpy",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
    "matplotlib",
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def git_state() -> str:
    """Commit and whether the work tree differs from it."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty= (with uncommitted changes)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes over `seconds` (this one sleeps meanwhile)."""
    before = machine_busy_s()
    time.sleep(seconds)
    after = machine_busy_s()
    return None if before is None or after is None else (after - before) / seconds


def machine_facts() -> dict[str, Any]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_mb": mem_total_mb(),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "versions": versions,
        "git": git_state(),
        "loadavg_start": list(os.getloadavg()),
        "busy_cores_start": busy_cores(),
    }


def own_cpu_s() -> float:
    """CPU seconds of this process, every thread (ONNX Runtime's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- corpora --------------------------------------------------------------------------------
def load_corpus(name: str) -> tuple[list[str], str]:
    """The texts of corpus `name` from ``loadtests.corpus.load`` and a description of it."""
    module = importlib.import_module("loadtests.corpus")
    texts = [str(text) for text in module.load(name)]
    return texts, corpus_description(module.__doc__ or "", name)


def corpus_description(doc: str, name: str) -> str:
    """The bullet about `name` in the corpus module's docstring (``- ``name``: ...`` and its
    indented continuation lines), or just the file's path."""
    lines = doc.splitlines()
    for at, line in enumerate(lines):
        if line.strip().startswith(f"- ``{name}``"):
            parts = [line.strip()[2:]]
            for more in lines[at + 1 :]:
                if not more.startswith("  ") or more.strip().startswith("- "):
                    break
                parts.append(more.strip())
            return " ".join(parts).replace("``", "`")
    return f"`loadtests/corpus/{name}.jsonl`"


def describe(texts: Sequence[str], tokens: Sequence[int], limit: int) -> dict[str, Any]:
    """Size figures of a corpus: texts, characters and tokens."""
    chars = [len(t) for t in texts]
    words = [len(t.split()) for t in texts]
    return {
        "texts": len(texts),
        "distinct": len(set(texts)),
        "words": {"median": percentile(words, 50), "max": max(words)},
        "chars": {"median": percentile(chars, 50), "max": max(chars)},
        "tokens": {
            "median": percentile(tokens, 50),
            "mean": sum(tokens) / len(tokens),
            "p90": percentile(tokens, 90),
            "p99": percentile(tokens, 99),
            "max": max(tokens),
            "at_limit": sum(1 for t in tokens if t >= limit),
        },
    }
