"""The sidecar scenario: an ingestion job and search queries on one server (priority lanes).

Four ingestion clients post ``/embed/batch`` with 32 texts each, as fast as answered, and at
the same time four query clients post ``/embed`` with one text each. Measured on a server
with priority lanes (the packed server's settings) and on one with the lanes off
(``INTERACTIVE_MAX_TEXTS=0``: every request in one FIFO lane), in turns, per repeat: a lone
query on the idle server, the ingestion alone, then both together. The issue's targets:
queries' p99 <= 100 ms under the mix, total texts/s >= 0.9x the ingestion alone, the
ingestion keeping >= 50% of its rate.
"""

from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path
from typing import Any

from devkit.loadclient import LoadResult, LoadSpec, run_load, text_bodies

INGEST_CLIENTS = 4
QUERY_CLIENTS = 4
GROUP = 32
IDLE_QUERIES = 150
# The server without lanes: every request in the bulk lane, served in order of arrival.
FIFO_ENV = {"INTERACTIVE_MAX_TEXTS": "0"}
MODES = ("lanes", "fifo")


def _spec(server: Any, path: str, bodies: list[Any], clients: int, **kw: Any) -> LoadSpec:
    seconds = kw.get("duration_s") or 60.0
    return LoadSpec(
        port=server.port,
        path=path,
        bodies=bodies,
        clients=clients,
        deadline_s=seconds + 120.0,
        retry_after_cap_s=0.0,
        server_pid=server.pid,
        **kw,
    )


def _together(specs: dict[str, LoadSpec]) -> dict[str, LoadResult]:
    """Run the loads at the same time (each in its own client process)."""
    results: dict[str, LoadResult] = {}
    threads = [
        threading.Thread(target=lambda k=k, s=s: results.__setitem__(k, run_load(s)))
        for k, s in specs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def measure(server: Any, texts_path: Path, seconds: float) -> dict[str, Any]:
    """One round on `server`: a lone query, the ingestion alone, then ingestion + queries."""
    texts = json.loads(texts_path.read_text())
    ingest_path, ingest = text_bodies(texts, "batch", group=GROUP)
    query_path, queries = text_bodies(texts[::-1], "embed")
    idle = run_load(_spec(server, query_path, queries, 1, max_requests=IDLE_QUERIES))
    alone = run_load(_spec(server, ingest_path, ingest, INGEST_CLIENTS, duration_s=seconds))
    mix = _together(
        {
            "ingest": _spec(server, ingest_path, ingest, INGEST_CLIENTS, duration_s=seconds),
            "query": _spec(server, query_path, queries, QUERY_CLIENTS, duration_s=seconds),
        }
    )
    ingest_tps = mix["ingest"].ok * GROUP / mix["ingest"].wall_s
    queries_per_s = mix["query"].ok / mix["query"].wall_s
    alone_tps = alone.ok * GROUP / alone.wall_s
    return {
        "idle_p50_ms": idle.latency_200_s["p50"] * 1000,
        "alone_tps": alone_tps,
        "mix_ingest_tps": ingest_tps,
        "mix_queries_per_s": queries_per_s,
        "query_p50_ms": mix["query"].latency_200_s["p50"] * 1000,
        "query_p99_ms": mix["query"].latency_200_s["p99"] * 1000,
        "total_ratio": (ingest_tps + queries_per_s) / alone_tps if alone_tps else 0.0,
        "ingest_share": ingest_tps / alone_tps if alone_tps else 0.0,
        "errors": idle.errors + alone.errors + mix["ingest"].errors + mix["query"].errors,
    }


FIELDS = (
    ("idle_p50_ms", "lone query p50 ms", 1),
    ("query_p50_ms", "query p50 ms (mix)", 1),
    ("query_p99_ms", "query p99 ms (mix)", 1),
    ("alone_tps", "ingestion alone texts/s", 1),
    ("mix_ingest_tps", "ingestion texts/s (mix)", 1),
    ("mix_queries_per_s", "queries/s (mix)", 1),
    ("total_ratio", "total / ingestion alone", 2),
    ("ingest_share", "ingestion kept", 2),
    ("errors", "errors", 0),
)


def medians(rounds: list[dict[str, Any]], mode: str) -> dict[str, float]:
    """The median of each figure over `mode`'s rounds."""
    rows = [r for r in rounds if r["mode"] == mode]
    return {key: statistics.median(r[key] for r in rows) for key, _, _ in FIELDS} if rows else {}


def table(rounds: list[dict[str, Any]]) -> str:
    """Markdown: one column per mode, medians over the rounds, then the targets."""
    if not rounds:
        return "Not measured in this run (`--sidecar-s 0`)."
    figures = {mode: medians(rounds, mode) for mode in MODES}
    lines = [
        "| figure | " + " | ".join(MODES) + " |",
        "| --- | " + " | ".join("---:" for _ in MODES) + " |",
    ]
    for key, label, digits in FIELDS:
        cells = [f"{figures[m][key]:,.{digits}f}" if figures[m] else "-" for m in MODES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lanes = figures["lanes"]
    if lanes:
        checks = [
            ("query p99 <= 100 ms under the mix", lanes["query_p99_ms"] <= 100),
            ("query p50 <= 3x a lone query", lanes["query_p50_ms"] <= 3 * lanes["idle_p50_ms"]),
            ("total texts/s >= 0.9x the ingestion alone", lanes["total_ratio"] >= 0.9),
            ("the ingestion keeps >= 50% of its rate", lanes["ingest_share"] >= 0.5),
        ]
        lines += [""] + [f"- {name}: **{'met' if ok else 'missed'}**" for name, ok in checks]
    return "\n".join(lines)
