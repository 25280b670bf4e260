"""Checks `make test-image` runs against real containers (scripts/image/check_*.sh call them).

    python scripts/image/checks.py embedding URL          # the container's = the local model's
    python scripts/image/checks.py stop URL CONTAINER     # docker stop under load drains
    python scripts/image/checks.py spread URL CONTAINER...  # traffic reached every replica

Each prints what it measured and exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [
    "A container, built and run for real.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings are lists of floats; this one has 384 of them.",
]
MIN_COSINE = 0.9999  # the importer's parity bar (tests/test_model_parity.py)


def check_embedding(url: str, models_dir: Path) -> bool:
    """/embed and /embed/batch of the container against the local model, loaded by embedserve."""
    from embedserve.engine.backend import load_spec
    from embedserve.models.importer import min_cosine
    from embedserve.models.store import ModelSpec, ModelStore

    store = ModelStore(models_dir)
    manifest = store.get(MODEL)
    if manifest is None:
        print(f"embedding: no local {MODEL} under {models_dir} (make model)")
        return False
    spec = ModelSpec(MODEL, "local", store.model_dir(MODEL), manifest)
    local = load_spec(spec, cache_dir=store.cache_dir(), threads=1, offline=True)
    try:
        expected = np.asarray(local.embed(TEXTS), dtype=np.float32)
    finally:
        local.close()
    with httpx.Client(base_url=url, timeout=60.0) as client:
        one = client.post("/embed", json={"text": TEXTS[0]})
        batch = client.post("/embed/batch", json={"texts": TEXTS})
    if one.status_code != 200 or batch.status_code != 200:
        print(f"embedding: /embed {one.status_code}, /embed/batch {batch.status_code}")
        return False
    got = np.asarray([one.json()["embedding"], *batch.json()["embeddings"]], dtype=np.float32)
    want = np.concatenate([expected[:1], expected])
    cosine = min_cosine(got, want)
    max_diff = float(np.max(np.abs(got - want)))
    ok = got.shape == want.shape and cosine >= MIN_COSINE
    print(
        f"embedding: {len(got)} embeddings of dimension {got.shape[1]}, min cosine to the local "
        f"model {cosine:.7f} (bar {MIN_COSINE}), max |diff| {max_diff:.2e}: "
        + ("equal" if ok else "DIFFERENT")
    )
    return ok


def check_stop(url: str, container: str, clients: int, texts: int, timeout_s: int) -> bool:
    """`clients` batch requests in flight, then `docker stop -t timeout_s`: every one is 200,
    the container exits 0, within the timeout (no SIGKILL)."""
    # About 250 tokens each (MiniLM truncates at 256): a few seconds of work on 2 cores.
    batch = {"texts": [f"{TEXTS[i % 3]} Request text number {i}. " * 20 for i in range(texts)]}
    finished: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        # A connection of its own per request: each is accepted before the stop.
        with httpx.Client(base_url=url, timeout=120.0) as client:
            try:
                status = client.post("/embed/batch", json=batch).status_code
            except httpx.HTTPError as exc:
                print(f"stop: a request accepted before the stop failed: {exc!r}")
                status = 0
        with lock:
            finished.append((status, time.monotonic()))

    with httpx.Client(base_url=url, timeout=10.0) as probe:

        def model_figures() -> dict[str, Any]:
            figures: dict[str, Any] = probe.get("/metrics").json()["batching"]["models"]
            return figures.get(MODEL, {})

        ran_at_start = int(model_figures().get("texts", 0))

        def accepted() -> int:
            """Texts the server holds or has run in a batch since the start (its own metrics).
            Run, not answered: a request's texts run in several batches, and those already
            run are neither queued nor in flight until the whole request is answered."""
            model = model_figures()
            held = int(model.get("queue_depth", 0)) + int(model.get("in_flight", 0))
            return int(model.get("texts", 0)) - ran_at_start + held

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(one, i) for i in range(clients)]
            # "Accepted": the server has every request's texts queued, running or answered.
            # A request still in a socket buffer at SIGTERM is not accepted: the server
            # may refuse it (503) or close its connection unread.
            deadline = time.monotonic() + 30.0
            while accepted() < clients * texts and time.monotonic() < deadline:
                time.sleep(0.05)
            all_accepted = accepted() >= clients * texts
            with lock:
                done_before = len(finished)
            stop_at = time.monotonic()
            stopped = subprocess.run(
                ["docker", "stop", "-t", str(timeout_s), container],
                capture_output=True,
                text=True,
                check=False,
            )
            stop_s = time.monotonic() - stop_at
            for future in futures:
                future.result()
    state = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    exit_code, oom = int(state[0]), state[1] == "true"
    statuses = [status for status, _ in finished]
    in_flight = sum(1 for _, at in finished if at > stop_at)
    ok = (
        all_accepted
        and stopped.returncode == 0
        and statuses == [200] * clients
        and in_flight > 0
        and exit_code == 0
        and not oom
        and stop_s < timeout_s
    )
    print(
        f"stop: {clients} batch requests of {texts} texts"
        + ("" if all_accepted else " NOT all accepted within 30 s")
        + f", {done_before} answered before and {in_flight} still in flight at "
        f"`docker stop -t {timeout_s}`; answers {sorted(set(statuses))} "
        f"({statuses.count(200)}/{clients} 200); stopped in {stop_s:.1f} s, exit code "
        f"{exit_code}{', OOM-killed' if oom else ''}: " + ("drained" if ok else "FAILED")
    )
    return ok


def replica_requests(container: str) -> int:
    """The replica's own count of requests served (JSON /metrics), read inside it."""
    probe = (
        "import json, urllib.request as r; "
        "print(json.load(r.urlopen('http://127.0.0.1:8000/metrics', timeout=5))['total_requests'])"
    )
    out = subprocess.run(
        ["docker", "exec", container, "python", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def check_spread(url: str, containers: list[str], requests: int) -> bool:
    """`requests` /embed calls through `url` (nginx), 8 at a time: each replica served some."""
    before = {c: replica_requests(c) for c in containers}

    def one(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60.0) as client:
            return client.post("/embed", json={"text": f"{TEXTS[i % 3]} {i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(requests)))
    served = {c: replica_requests(c) - before[c] for c in containers}
    ok = statuses == [200] * requests and all(n > 0 for n in served.values())
    print(
        f"spread: {statuses.count(200)}/{requests} answered 200 through nginx; per replica "
        + ", ".join(f"{c}: {n}" for c, n in served.items())
        + (": every replica served" if ok else ": FAILED")
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="check", required=True)
    embedding = sub.add_parser("embedding")
    embedding.add_argument("url")
    embedding.add_argument(
        "--models-dir", type=Path, default=Path(os.environ.get("MODELS_DIR", "models"))
    )
    stop = sub.add_parser("stop")
    stop.add_argument("url")
    stop.add_argument("container")
    stop.add_argument("--clients", type=int, default=12)
    stop.add_argument("--texts", type=int, default=32)
    stop.add_argument("--timeout", type=int, default=40)
    spread = sub.add_parser("spread")
    spread.add_argument("url")
    spread.add_argument("containers", nargs="+")
    spread.add_argument("--requests", type=int, default=40)
    args = parser.parse_args(argv)
    if args.check == "embedding":
        ok = check_embedding(args.url, args.models_dir)
    elif args.check == "stop":
        ok = check_stop(args.url, args.container, args.clients, args.texts, args.timeout)
    else:
        ok = check_spread(args.url, args.containers, args.requests)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
