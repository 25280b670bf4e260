"""Faults in a real server: corrupt model files, a backend raising mid-batch, clients leaving.

Each test runs the real server (subprocess, real ONNX model) on loopback and records its
figures for docs/RELIABILITY.md (area "Faults"). The backend fault comes from
tests/faultserver.py, the real server with a model that raises on a marker text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.launcher import DEFAULT_MODEL, embedserve_command, models_dir, running_server
from embedserve.engine.batcher import PROBE_TEXT
from embedserve.models.store import (
    MODEL_FILE,
    PACKED_MODEL_FILE,
    ModelStore,
    file_sha256,
    verify_model_file,
)
from tests.leaks import assert_no_leak
from tests.reliability import Recorder
from tests.support import words

pytestmark = [
    pytest.mark.integration,
    pytest.mark.reliability,
    pytest.mark.anyio,
    pytest.mark.timeout(180),
]

AREA = "Faults"
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Library internals behind these faults, which no answer should name.
INTERNALS = ("onnxruntime", "INVALID_PROTOBUF", "InvalidProtobuf", "NonFinite", "InjectedFault")


def assert_clean(text: str, *paths: Path) -> None:
    """No stack trace, server path or library internals in an answer."""
    assert_no_leak(text, paths=paths)
    for fragment in INTERNALS:
        assert fragment not in text, (fragment, text)


async def metrics_json(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Unlabelled samples of the Prometheus exposition (tasks, fds, evictions, ...)."""
    response = await client.get("/metrics", headers={"Accept": "text/plain"})
    assert response.status_code == 200, response.text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.labels
    }


# -- corrupt or truncated model files ----------------------------------------------------
SPARE = "spare/all-MiniLM-L6-v2"  # a healthy copy: loading it shows eviction is live
# name -> (model file variant, manifest checksum matches the damaged file?, cause in the log)
GRAPH_FILES = (MODEL_FILE, PACKED_MODEL_FILE)
BROKEN = {
    "broken/truncated": ("truncated", False, "does not match"),
    "broken/garbled": ("garbled", False, "does not match"),
    "broken/no-model-file": ("missing", False, "unreadable"),
    "broken/truncated-rehashed": ("truncated", True, "INVALID_PROTOBUF"),
    "broken/garbled-rehashed": ("garbled", True, "non-finite"),
}


def install(
    source: Path, root: Path, name: str, graphs: dict[str, Path | None], sha256: dict[str, str]
) -> None:
    """`source`'s files hard-linked under `root/name`, with `graphs[file]` as each graph file
    (None: no such file) and a manifest naming `name` with the checksums `sha256`."""
    store = ModelStore(root)
    target = store.model_dir(name)
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name not in (*GRAPH_FILES, "embedserve.json"):
            os.link(path, target / path.name)
    for graph, model_file in graphs.items():
        if model_file is not None:
            os.link(model_file, target / graph)
    manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
    assert manifest is not None
    store.write_manifest(
        target,
        dataclasses.replace(
            manifest,
            name=name,
            onnx_sha256=sha256[MODEL_FILE],
            packed_sha256=sha256.get(PACKED_MODEL_FILE, ""),
        ),
    )


def damage(good_file: Path, tmp_path: Path) -> dict[str, Path]:
    """A truncated and a garbled copy of the graph `good_file`."""
    size = good_file.stat().st_size
    stem = good_file.name.removesuffix(".onnx")
    damaged = {
        "truncated": tmp_path / f"{stem}.truncated.onnx",
        "garbled": tmp_path / f"{stem}.garbled.onnx",
    }
    with good_file.open("rb") as whole, damaged["truncated"].open("wb") as half:
        half.write(whole.read(size // 2))
    shutil.copyfile(good_file, damaged["garbled"])
    with damaged["garbled"].open("r+b") as garbled:
        # NaN bytes in weights every text uses (the first half of the file is the word
        # embeddings, where only the rows of some tokens would turn NaN).
        garbled.seek(int(size * 0.9))
        garbled.write(b"\xff" * 65536)
    return damaged


def build_models_dir(source: Path, tmp_path: Path) -> Path:
    """The good model, a spare copy, and every BROKEN variant, under ``tmp_path/models``.

    A variant damages every graph the model has (``model.onnx`` and, when imported with
    one, ``model.packed.onnx``), so it is broken whichever path the server runs."""
    root = tmp_path / "models"
    graphs = [g for g in GRAPH_FILES if (source / g).is_file()]
    damaged = {graph: damage(source / graph, tmp_path) for graph in graphs}
    good = {graph: source / graph for graph in graphs}
    original = {graph: file_sha256(source / graph) for graph in graphs}
    install(source, root, DEFAULT_MODEL, good, original)
    install(source, root, SPARE, good, original)
    for name, (variant, rehashed, _) in BROKEN.items():
        files = {graph: damaged[graph].get(variant) for graph in graphs}
        sha = {
            graph: file_sha256(path) if rehashed and path else original[graph]
            for graph, path in files.items()
        }
        install(source, root, name, files, sha)
    return root


async def test_corrupt_model_files_fail_cleanly_and_the_good_model_keeps_serving(
    exported_model: Path, tmp_path: Path, reliability: Recorder
) -> None:
    root = build_models_dir(exported_model, tmp_path)
    manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
    assert manifest is not None
    started = time.perf_counter()
    verify_model_file(exported_model, manifest)  # what every load of a local model now does
    checksum_s = time.perf_counter() - started
    env = {
        "MODELS_DIR": str(root),
        "ALLOWED_MODELS": ",".join([DEFAULT_MODEL, SPARE, *BROKEN]),
        # One slot and no pinning: a load that wrongly made room would evict the good model.
        "MAX_CACHED_MODELS": "1",
        "PIN_REQUIRED_MODELS": "false",
        "LOAD_RETRY_S": "600",
    }
    good = Counter[int]()
    answers: dict[str, list[httpx.Response]] = {}
    with running_server(env, log_dir=tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client:
            done = anyio.Event()

            async def good_traffic(worker: int) -> None:
                n = 0
                while not done.is_set():
                    response = await client.post("/embed", json={"text": f"good {worker} {n}"})
                    good[response.status_code] += 1
                    n += 1

            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    for worker in range(2):
                        group.start_soon(good_traffic, worker)
                    for name in BROKEN:
                        # The first request loads (and fails); the second is refused from
                        # the remembered failure, in OpenAI's shape.
                        first = await client.post("/embed", json={"text": "x", "model_name": name})
                        second = await client.post(
                            "/v1/embeddings", json={"input": "x", "model": name}
                        )
                        answers[name] = [first, second]
                    done.set()
                models = (await client.get("/models")).json()
                load_s = (await client.get(f"/models/{DEFAULT_MODEL}")).json()
                before_spare = await scrape(client)
                after = await client.post("/embed", json={"text": "after the failures"})
                spare = await client.post("/embed", json={"text": "x", "model_name": SPARE})
                after_spare = await scrape(client)
        log = server.log()

    statuses = Counter(r.status_code for pair in answers.values() for r in pair)
    evictions = before_spare["embedserve_model_evictions_total"]
    control = after_spare["embedserve_model_evictions_total"]
    size_mb = (exported_model / MODEL_FILE).stat().st_size / 1e6
    reliability.record(
        AREA,
        "Corrupt / truncated model file",
        tried=(
            "5 broken copies of the model (truncated; 64 KiB overwritten; model.onnx missing; "
            "truncated and overwritten with a matching checksum), each asked for twice "
            "(/embed, /v1/embeddings) while 2 clients kept using the good model; "
            "MAX_CACHED_MODELS=1, pinning off"
        ),
        amount=f"{statuses.total()} broken-model requests, {good.total()} good ones",
        outcome=(
            f"broken: {dict(statuses)} (model_unavailable); good model: {dict(good)}, still "
            f"loaded ({', '.join(models['cached_models'])}), {evictions:g} evictions "
            f"({control:g} once a healthy second model loaded); checksum check "
            f"{checksum_s:.2f} s for {size_mb:.0f} MB (load + warm-up {load_s['load_time']:g} s)"
        ),
    )
    for name, (_, _, cause) in BROKEN.items():
        first, second = answers[name]
        assert first.status_code == 503, (name, first.text)
        body = first.json()
        assert set(body) == {"error", "error_type"}
        assert body["error_type"] == "model_unavailable"
        assert f"model {name} failed to load" in body["error"]
        assert second.status_code == 503, (name, second.text)
        error = second.json()["error"]
        assert (error["code"], error["type"]) == ("model_unavailable", "server_error")
        assert f"model {name} failed to load" in error["message"]
        for response in (first, second):
            assert_clean(response.text, root, tmp_path)
        assert log.count(f"loading model {name} (local)") == 1, name  # the retry was refused
        assert cause in log, (name, cause)  # the operator's log keeps the reason
    assert set(good) == {200}
    assert models["cached_models"] == [DEFAULT_MODEL]
    assert before_spare["embedserve_model_evictions_total"] == 0
    assert before_spare["embedserve_models_loaded"] == 1
    assert after.status_code == 200, after.text
    # The control: a healthy second model does take the one slot.
    assert spare.status_code == 200, spare.text
    assert after_spare["embedserve_model_evictions_total"] == 1


# -- the backend raising mid-batch -----------------------------------------------------
MARKER = "__fault__"
FAULT_REQUESTS = 960
FAULT_EVERY = 8
FAULT_CLIENTS = 32
RECOVERY_REQUESTS = 64


def read_calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Batch:
    texts: list[str]
    raised: bool  # its first call
    failed: list[str]  # the texts that failed after the batcher's retries
    calls: int


def replay(calls: list[dict[str, Any]]) -> list[Batch]:
    """Group the logged model calls into the batcher's batches, checking that each batch's
    retries follow its rule (embedserve/engine/batcher.py, `_isolate`): after a failed call of
    more than one text, its two halves are run; a failed half is split again; when both
    halves of more than two texts failed, one probe call on PROBE_TEXT (once per batch)
    decides whether to go on. One model runs one call at a time, so a batch's calls are
    consecutive in the log."""
    batches: list[Batch] = []
    position = 0

    def call(texts: list[str]) -> bool:
        nonlocal position
        assert calls[position]["texts"] == texts, (position, calls[position], texts)
        position += 1
        return bool(calls[position - 1]["failed"])

    def isolate(texts: list[str], health: list[bool]) -> list[str]:
        if len(texts) == 1:
            return texts
        halves = (texts[: len(texts) // 2], texts[len(texts) // 2 :])
        failed = [call(half) for half in halves]
        if all(failed) and len(texts) > 2:
            if not health:
                health.append(not call([PROBE_TEXT]))
            if not health[0]:
                return texts
        blamed = [half for half, bad in zip(halves, failed, strict=True) if bad]
        return [t for half in blamed for t in isolate(half, health)]

    while position < len(calls):
        first, texts = position, calls[position]["texts"]
        raised = call(texts)
        failed = isolate(texts, []) if raised else []
        batches.append(Batch(texts, raised, failed, position - first))
    return batches


async def test_backend_raising_mid_batch_fails_only_the_texts_to_blame(
    exported_model: Path, tmp_path: Path, reliability: Recorder
) -> None:
    batch_log = tmp_path / "batches.jsonl"
    # A short wait for companions, so innocent texts do share batches with markers.
    env = {"FAULT_BATCH_LOG": str(batch_log), "FAULT_MARKER": MARKER, "BATCH_MAX_WAIT_MS": "2"}
    rng = random.Random(7)
    texts = [
        f"{MARKER} {n} {words(rng, 6)}" if n % FAULT_EVERY == 0 else f"{n} {words(rng, 8)}"
        for n in range(FAULT_REQUESTS)
    ]
    recovery = [f"recovery {n} {words(rng, 8)}" for n in range(RECOVERY_REQUESTS)]
    results: dict[str, httpx.Response] = {}
    faulty = embedserve_command("tests.faultserver")
    with running_server(env, log_dir=tmp_path, command=faulty) as server:
        limits = httpx.Limits(max_connections=FAULT_CLIENTS)
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=HTTP_TIMEOUT, limits=limits
        ) as client:
            lanes = anyio.Semaphore(FAULT_CLIENTS)

            async def send(n: int, text: str) -> None:
                async with lanes:
                    if n % 2:
                        body = {"input": text, "model": DEFAULT_MODEL}
                        results[text] = await client.post("/v1/embeddings", json=body)
                    else:
                        results[text] = await client.post("/embed", json={"text": text})

            started = time.perf_counter()
            with anyio.fail_after(120):
                async with anyio.create_task_group() as group:
                    for n, text in enumerate(texts):
                        group.start_soon(send, n, text)
                async with anyio.create_task_group() as group:
                    for n, text in enumerate(recovery):
                        group.start_soon(send, n, text)
            seconds = time.perf_counter() - started
            metrics = await metrics_json(client)
            health = await client.get("/health")

    calls = read_calls(batch_log)
    assert calls[0]["texts"] == [PROBE_TEXT]  # the load's warm-up
    calls = calls[1:]
    batches = replay(calls)
    batch_of = {text: b for b in batches for text in b.texts}
    failed_batches = [b for b in batches if b.failed]
    marked = [t for t in texts if MARKER in t]
    innocent_failed = [t for t in texts if MARKER not in t and results[t].status_code == 500]
    shared = [t for t in texts if MARKER not in t and MARKER in " ".join(batch_of[t].texts)]
    statuses = Counter(results[t].status_code for t in texts)
    probes = sum(c["texts"] == [PROBE_TEXT] for c in calls)
    raised = [b for b in batches if b.raised]
    reliability.record(
        AREA,
        "Backend raises mid-batch",
        tried=(
            f"fault server: the real model raises on any call holding a marker text; "
            f"{FAULT_CLIENTS} concurrent clients, every {FAULT_EVERY}th text marked, "
            "/embed and /v1/embeddings; then unmarked requests"
        ),
        amount=(
            f"{FAULT_REQUESTS} requests ({len(marked)} marked) + {RECOVERY_REQUESTS} after, "
            f"{seconds:.1f} s"
        ),
        outcome=(
            f"{dict(statuses)}; {len(raised)} of {len(batches)} batches raised "
            f"({len(calls)} model calls in all: retries of halves and {probes} probe calls "
            f"included); {len(innocent_failed)} of the {len(shared)} unmarked requests that "
            f"shared a batch with a marker failed; after: "
            f"{dict(Counter(results[t].status_code for t in recovery))}"
        ),
    )
    assert sorted(batch_of) == sorted(texts + recovery), "every text ran in one batch"
    assert sum(len(b.texts) for b in batches) == len(batch_of)
    # The model raised exactly on the calls holding a marker.
    assert all(c["failed"] == (MARKER in " ".join(c["texts"])) for c in calls)
    for b in batches:
        markers = sum(MARKER in t for t in b.texts)
        # About 2 log2(n) more calls for each marker in the batch, and at most one probe.
        assert b.calls <= 2 + 2 * markers * math.ceil(math.log2(len(b.texts))), b
    for text in texts + recovery:
        response = results[text]
        if text in batch_of[text].failed:
            assert response.status_code == 500, (text, response.text)
            assert_clean(response.text)
            body = response.json()
            if isinstance(body["error"], dict):  # /v1: OpenAI's shape
                assert body["error"]["code"] == "inference_error"
                assert body["error"]["type"] == "server_error"
            else:
                assert body == {
                    "error": f"inference failed for model {DEFAULT_MODEL}",
                    "error_type": "inference_error",
                }
        else:
            assert response.status_code == 200, (text, response.text)
    assert all(text in batch_of[text].failed for text in marked)
    # The probe never fails here (the model works), so only the marked texts fail.
    assert innocent_failed == []
    model = metrics["batching"]["models"][DEFAULT_MODEL]
    assert model["failed_batches"] == len(failed_batches)
    assert (model["queue_depth"], model["in_flight"]) == (0, 0)
    assert health.status_code == 200


# -- clients disconnecting while queued and while their batch runs ---------------------
WAVES = 4
WAVE_CLIENTS = 50
TEXTS_PER_REQUEST = 8
SETTLE_S = 20.0  # bound on the return to baseline (the last running batch takes < 1 s)


def raw_request(texts: list[str]) -> bytes:
    body = json.dumps({"texts": texts}).encode()
    head = (
        "POST /embed/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def wait_for(
    client: httpx.AsyncClient, predicate: Any, timeout_s: float, what: str
) -> dict[str, Any]:
    """Poll /metrics (JSON) until `predicate(model_figures)` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures: dict[str, Any] = (await metrics_json(client))["batching"]["models"][DEFAULT_MODEL]
        if predicate(figures):
            return figures
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:g}s: {figures}")
        await asyncio.sleep(0.01)


def idle(figures: dict[str, Any]) -> bool:
    return figures["queue_depth"] == 0 and figures["in_flight"] == 0


async def test_clients_leaving_while_queued_or_running_leak_nothing(
    exported_model: Path, tmp_path: Path, reliability: Recorder
) -> None:
    # A token budget that takes a wave's first 64 texts as one batch, long enough (hundreds
    # of ms on 2 cores) for its clients to leave while it runs.
    env = {"BATCH_TOKEN_BUDGET": "8192", "BATCH_MAX_TEXTS": "64", "MAX_QUEUE_SIZE": "4096"}
    rng = random.Random(11)
    blocker_texts = [[words(rng, 200) for _ in range(4)] for _ in range(WAVES)]
    wave_texts = [
        [[words(rng, 40) for _ in range(TEXTS_PER_REQUEST)] for _ in range(WAVE_CLIENTS)]
        for _ in range(WAVES)
    ]
    peaks: list[dict[str, float]] = []  # scraped just before each wave's clients leave
    with running_server(env, log_dir=tmp_path) as server:
        # One connection, used by one request at a time: the baseline holds it.
        async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client:

            async def wave(n: int) -> int:
                """A long request holds the model; WAVE_CLIENTS raw clients queue behind it;
                once it is answered and their first batch runs, all of them leave. Returns
                the texts in that running batch."""
                # The previous wave's last batch must be over, or the planner may run some
                # of this wave's short texts before the long blocker.
                await wait_for(client, idle, SETTLE_S, "the previous wave's end")
                async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as own:
                    blocker = asyncio.ensure_future(
                        own.post("/embed/batch", json={"texts": blocker_texts[n]})
                    )
                    await wait_for(client, lambda m: m["in_flight"] > 0, 30, "blocker running")
                    streams = [
                        await asyncio.open_connection("127.0.0.1", server.port)
                        for _ in range(WAVE_CLIENTS)
                    ]
                    for (_, writer), texts in zip(streams, wave_texts[n], strict=True):
                        writer.write(raw_request(texts))
                        await writer.drain()
                    assert (await blocker).status_code == 200
                figures = await wait_for(
                    client, lambda m: m["in_flight"] > 0, 30, "the wave's first batch running"
                )
                peaks.append(await scrape(client))
                for _, writer in streams:
                    writer.close()
                return int(figures["in_flight"])

            with anyio.fail_after(150):
                before = await scrape(client)
                start_figures = await metrics_json(client)
                started = time.perf_counter()
                running_texts = [await wave(n) for n in range(WAVES)]
                settled = time.perf_counter()
                deadline = settled + SETTLE_S
                while True:
                    after = await scrape(client)
                    figures = await metrics_json(client)
                    model = figures["batching"]["models"][DEFAULT_MODEL]
                    back = (
                        model["queue_depth"] == 0
                        and model["in_flight"] == 0
                        and after["embedserve_event_loop_tasks"]
                        <= before["embedserve_event_loop_tasks"]
                        and after["process_open_fds"] <= before["process_open_fds"]
                    )
                    if back or time.perf_counter() > deadline:
                        break
                    await asyncio.sleep(0.05)
                settle_s = time.perf_counter() - settled
                seconds = settled - started
                still = await client.post("/embed", json={"text": "still serving"})

    start_model = start_figures["batching"]["models"][DEFAULT_MODEL]
    dropped = model["dropped_texts"] - start_model["dropped_texts"]
    gone = figures["errors"].get("client_disconnected", 0) - start_figures["errors"].get(
        "client_disconnected", 0
    )
    clients = WAVES * WAVE_CLIENTS

    def peak(what: str) -> float:
        name = "embedserve_event_loop_tasks" if what == "tasks" else "process_open_fds"
        return max(sample[name] for sample in peaks)

    sent_texts = clients * TEXTS_PER_REQUEST
    reliability.record(
        AREA,
        "Disconnects while queued / in a running batch",
        tried=(
            f"{WAVES} waves: a long request holds the model, {WAVE_CLIENTS} raw clients queue "
            f"{TEXTS_PER_REQUEST}-text requests behind it and close their sockets once the "
            "first batch of their wave runs"
        ),
        amount=f"{clients} clients, {sent_texts} texts, {seconds:.1f} s",
        outcome=(
            f"{gone} disconnects seen; {dropped} texts dropped from the queue, "
            f"{sum(running_texts)} in a running batch when their clients left; "
            f"queue depth {model['queue_depth']}, in flight {model['in_flight']}; "
            f"tasks {before['embedserve_event_loop_tasks']:g} -> peak {peak('tasks'):g} -> "
            f"{after['embedserve_event_loop_tasks']:g}, open fds "
            f"{before['process_open_fds']:g} -> peak {peak('fds'):g} -> "
            f"{after['process_open_fds']:g} (settled in {settle_s:.1f} s)"
        ),
    )
    assert (model["queue_depth"], model["in_flight"]) == (0, 0)
    assert after["embedserve_event_loop_tasks"] <= before["embedserve_event_loop_tasks"]
    assert after["process_open_fds"] <= before["process_open_fds"]
    assert peak("fds") >= before["process_open_fds"] + WAVE_CLIENTS  # the clients were there
    assert gone == clients, "every departure was noticed"
    assert all(running_texts), "each wave left while a batch of its own was running"
    # Texts of the requests in the running batches ran; every other text was dropped unrun.
    assert sent_texts - sum(running_texts) - TEXTS_PER_REQUEST * WAVES <= dropped
    assert dropped <= sent_texts - sum(running_texts)
    assert still.status_code == 200, still.text
