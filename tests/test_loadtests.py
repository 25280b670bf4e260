"""The load-test kit: the committed corpora, the Locust file and the runner (`loadtests/`).

Locust (gevent) is only ever run in a subprocess, never imported here: its monkey-patching
and import-time warnings stay out of the test process.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from devkit.launcher import ROOT, server_env
from loadtests import corpus
from loadtests.run import CSV_PREFIX, parse_timespan

RUN_TIMEOUT_S = 240.0  # a whole run.py invocation, server start-up and stop included


def _words(texts: list[str]) -> list[int]:
    return [corpus.word_count(text) for text in texts]


# -- the corpora -------------------------------------------------------------------------------
def test_corpora_have_their_sizes_and_distinct_texts() -> None:
    mixed, short = corpus.load("mixed"), corpus.load("short")
    assert len(mixed) >= 2000
    assert len(short) == 2000
    for texts in (mixed, short):
        assert len(set(texts)) == len(texts)
        assert all(text == text.strip() and text for text in texts)


def test_mixed_lengths_are_long_tailed_from_3_to_past_150_words() -> None:
    counts = _words(corpus.load("mixed"))
    assert min(counts) == 3
    assert sum(count >= 150 for count in counts) >= 20

    def share(low: int, high: int) -> float:
        return sum(low <= count <= high for count in counts) / len(counts)

    assert share(5, 30) > 0.75  # most texts
    assert 0.05 < share(80, 200) < 0.12  # the tail, about 8%
    assert share(3, 4) > 0.005  # a few very short ones
    assert 8 <= statistics.median(counts) <= 25


def test_short_lengths_are_uniform_from_10_to_20_words() -> None:
    lengths = Counter(_words(corpus.load("short")))
    assert sorted(lengths) == list(range(10, 21))
    expected = 2000 / 11
    assert all(0.7 * expected < n < 1.3 * expected for n in lengths.values()), lengths


def test_corpora_read_like_varied_english() -> None:
    texts = corpus.load("mixed")
    words = Counter(word.strip(".,;:?!\"'`()").lower() for text in texts for word in text.split())
    assert len(words) > 1500  # a large vocabulary, not a word list
    top = {word for word, _ in words.most_common(12)}
    assert {"the", "and", "to"} <= top  # function words lead, as in English
    assert any(not text.isascii() for text in texts)
    assert sum(text.endswith("?") for text in texts) > 100  # questions
    assert any("`" in text for text in texts)  # code-ish snippets
    assert any(any(ch.isdigit() for ch in text) for text in texts)


def test_files_are_modest_and_one_json_string_per_line() -> None:
    sizes = [corpus.path(name).stat().st_size for name in corpus.CORPORA]
    assert sum(sizes) < 2_000_000
    for name in corpus.CORPORA:
        for line in corpus.path(name).read_text(encoding="utf-8").splitlines():
            assert isinstance(json.loads(line), str)


def test_committed_files_equal_the_generator() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.corpus", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_names_a_file_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "CORPUS_DIR", tmp_path)
    (tmp_path / "mixed.jsonl").write_bytes(corpus.render(corpus.generate("mixed")))
    (tmp_path / "short.jsonl").write_bytes(corpus.render(corpus.generate("short")[1:]))
    assert corpus.check() == ["short"]


def test_load_refuses_an_unknown_corpus() -> None:
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus.load("../README")


# -- the runner --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("60s", 60), ("2m", 120), ("1m30s", 90), ("1h", 3600)]
)
def test_parse_timespan(text: str, seconds: int) -> None:
    assert parse_timespan(text) == seconds


def _clean_env() -> dict[str, str]:
    """No embedserve setting and no LOADTEST_* / EMBEDSERVE_MODEL from the developer's shell."""
    return {key: value for key, value in server_env().items() if not key.startswith("LOADTEST_")}


def _run(args: list[str], reports: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``python -m loadtests.run`` with `args`; its result and its report directory."""
    command = [sys.executable, "-m", "loadtests.run", "--reports-dir", str(reports), *args]
    done = subprocess.run(
        command, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    [out] = list(reports.iterdir())
    return done, out


def _rows(out: Path, kind: str = "stats") -> dict[tuple[str, str], dict[str, str]]:
    with (out / f"{CSV_PREFIX}_{kind}.csv").open(newline="") as file:
        if kind == "failures":
            return {(row["Name"], row["Error"]): row for row in csv.DictReader(file)}
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}


class _StubHandler(BaseHTTPRequestHandler):
    """A fake server: /embed answers 404 model_not_found, /embed/batch allows 16 texts."""

    protocol_version = "HTTP/1.1"
    batch_sizes: list[int]  # set on the subclass a test makes

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer(404, {"error": "not found", "error_type": "not_found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/embed":
            self._answer(404, {"error": "no such model", "error_type": "model_not_found"})
            return
        count = len(body["texts"])
        self.batch_sizes.append(count)
        if count > 16:
            message = f"invalid field 'texts': {count} texts, over the limit of 16 (MAX_BATCH_SIZE)"
            self._answer(422, {"error": message, "error_type": "validation_error"})
            return
        timing = {"X-Queue-Time": "1.250", "X-Inference-Time": "2.500"}
        self._answer(200, {"embeddings": [[0.0]] * count, "count": count}, timing)


@pytest.fixture
def stub_server() -> Iterator[tuple[str, list[int]]]:
    sizes: list[int] = []
    handler = type("Handler", (_StubHandler,), {"batch_sizes": sizes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sizes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.timeout(180)
def test_locust_records_error_types_server_timings_and_the_batch_cap(
    stub_server: tuple[str, list[int]], tmp_path: Path
) -> None:
    host, sizes = stub_server
    args = ["--host", host, "--users", "4", "--spawn-rate", "4", "--time", "3s"]
    args += ["--profile", "mixed", "--single-weight", "1", "--batch-weight", "1"]
    done, out = _run(args, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr  # Locust: some requests failed

    stats = _rows(out)
    single = stats["POST", "/embed"]
    assert int(single["Request Count"]) > 0
    assert single["Failure Count"] == single["Request Count"]
    assert ("SERVER", "/embed queue_time") not in stats  # failures carry no timings
    [failure] = _rows(out, "failures").values()
    assert failure["Name"] == "/embed"
    assert "HTTP 404 model_not_found" in failure["Error"]

    batch = stats["POST", "/embed/batch"]
    assert int(batch["Request Count"]) > 0 and batch["Failure Count"] == "0"
    queue = stats["SERVER", "/embed/batch queue_time"]
    inference = stats["SERVER", "/embed/batch inference_time"]
    assert queue["Request Count"] == inference["Request Count"] == batch["Request Count"]
    assert float(queue["Average Response Time"]) == pytest.approx(1.25)
    assert float(inference["Average Response Time"]) == pytest.approx(2.5)
    assert 8 <= float(queue["Average Content Size"]) <= 16  # texts per request
    # The aggregated row counts client requests only, not the SERVER rows.
    total = int(stats["", "Aggregated"]["Request Count"])
    assert total == int(batch["Request Count"]) + int(single["Request Count"])

    probe, *sent = sizes  # one over --batch-max, answered 422 with the limit; then within it
    assert probe == 65
    assert sent and all(8 <= size <= 16 for size in sent)
    assert (out / "report.html").is_file()
    assert json.loads((out / "run.json").read_text())["host"] == host


# -- against the real server -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("exported_model")
def test_make_loadtest_runner_smoke(tmp_path: Path) -> None:
    args = ["--users", "4", "--spawn-rate", "4", "--time", "6s", "--profile", "mixed"]
    args += ["--single-weight", "1", "--batch-weight", "1"]
    done, out = _run(args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    stats = _rows(out)
    for name in ("/embed", "/embed/batch"):
        client = stats["POST", name]
        assert int(client["Request Count"]) > 0 and client["Failure Count"] == "0"
        for metric in ("queue_time", "inference_time"):
            row = stats["SERVER", f"{name} {metric}"]
            assert row["Request Count"] == client["Request Count"]
            # Each request's server-side time is part of its response time: so the means.
            server_ms = float(row["Average Response Time"])
            assert 0 <= server_ms <= float(client["Average Response Time"]), (metric, server_ms)
    assert stats["", "Aggregated"]["Failure Count"] == "0"
    assert not _rows(out, "failures")
    assert (out / "report.html").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["total_requests"] > 0
    host = json.loads((out / "run.json").read_text())["host"]
    with pytest.raises(httpx.TransportError):  # the server it started is gone
        httpx.get(f"{host}/health", timeout=2.0)
    assert "stopped" in done.stdout


class _LaneStubHandler(_StubHandler):
    """A fake server that records each request's path and X-Priority header."""

    seen: list[tuple[str, str | None]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append((self.path, self.headers.get("X-Priority")))
        count = len(body.get("texts", [body.get("text")]))
        if count > 16:
            message = f"invalid field 'texts': {count} texts, over the limit of 16 (MAX_BATCH_SIZE)"
            self._answer(422, {"error": message, "error_type": "validation_error"})
            return
        timing = {"X-Queue-Time": "1.000", "X-Inference-Time": "2.000"}
        self._answer(200, {"count": count}, timing)


@pytest.mark.timeout(180)
def test_the_sidecar_profile_reports_ingestion_and_queries_apart(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_LaneStubHandler,), {"seen": seen, "batch_sizes": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["--host", host, "--users", "4", "--spawn-rate", "4", "--time", "3s"]
        done, out = _run([*args, "--profile", "sidecar"], tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = _rows(out)
    for name in ("sidecar ingest", "sidecar query"):
        assert int(stats["POST", name]["Request Count"]) > 0
        assert (
            stats["SERVER", f"{name} queue_time"]["Request Count"]
            == (stats["POST", name]["Request Count"])
        )
    # Each group asks for its lane; batches are capped at the server's limit (16 here).
    lanes = {(path, lane) for path, lane in seen if lane is not None}
    assert lanes == {("/embed/batch", "bulk"), ("/embed", "interactive")}
    assert float(stats["SERVER", "sidecar ingest queue_time"]["Average Content Size"]) == 16
