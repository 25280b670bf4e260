"""SIGTERM while many clients are sending: every request the server took before the signal
is answered, later ones are refused, and the process exits within its grace period.

tests/test_server_integration.py signals once a fixed set of 32 requests is in; here the
load goes on through the signal, and every attempt is counted by when it was sent.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from devkit.launcher import running_server
from devkit.loadclient import LoadProcess, LoadResult, LoadSpec
from tests.reliability import Recorder
from tests.support import long_tailed_texts

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.anyio]

CLIENTS = 200
LOAD_BEFORE_SIGNAL_S = 3.0
GRACE_S = 10.0
# How late after a write the server may read it: a request sent this close to the signal may
# reach the app after it (then it is new, and refused with 503); and the signal handler may
# run this late on a busy loop (then a request sent just after the signal is still served).
READ_LAG_S = 0.5
# The interpreter's exit after the drain (models released, log flushed) is not instant.
EXIT_MARGIN_S = 2.0


def classify(result: LoadResult, signalled: float) -> dict[str, int]:
    """Counts of the attempts by when they were sent (before/after the signal) and outcome."""
    counts = {
        "sent": 0,  # before the signal
        "answered_200": 0,
        "answered_503": 0,
        "refused_503_early": 0,  # 503 for a request sent well before the signal: a defect
        "unanswered": 0,
        "late": 0,
        "late_200": 0,
        "late_503": 0,
        "late_refused": 0,  # connection refused, or closed unread by the stopping server
        "late_other": 0,
    }
    for sent_at, _, outcome in result.records:
        if sent_at < signalled:
            counts["sent"] += 1
            if outcome == "200":
                counts["answered_200"] += 1
            elif outcome == "503":
                counts["answered_503"] += 1
                if sent_at < signalled - READ_LAG_S:
                    counts["refused_503_early"] += 1
            else:
                counts["unanswered"] += 1
        else:
            counts["late"] += 1
            if outcome == "200":
                counts["late_200"] += 1
                if sent_at >= signalled + READ_LAG_S:
                    counts["late_other"] += 1
            elif outcome == "503":
                counts["late_503"] += 1
            elif outcome in ("refused", "closed"):
                counts["late_refused"] += 1
            else:
                counts["late_other"] += 1
    return counts


async def test_sigterm_under_load_answers_every_accepted_request(
    exported_model: Path, tmp_path: Path, reliability: Recorder
) -> None:
    """200 closed-loop clients; SIGTERM after 3 s of load; count every attempt."""
    texts = long_tailed_texts(1000, seed=41)
    env = {"SHUTDOWN_GRACE_S": str(GRACE_S)}
    with running_server(env, log_dir=tmp_path) as server:
        spec = LoadSpec(
            port=server.port,
            path="/embed",
            bodies=[{"text": text} for text in texts],
            clients=CLIENTS,
            duration_s=LOAD_BEFORE_SIGNAL_S + GRACE_S,
            deadline_s=LOAD_BEFORE_SIGNAL_S + GRACE_S + 20,
            request_timeout_s=GRACE_S + 10,
            keep_records=True,
        )
        load = await LoadProcess.start(spec, tmp_path / "load.json")
        try:
            started = await load.started()
            await anyio.sleep(max(0.0, started + LOAD_BEFORE_SIGNAL_S - time.monotonic()))
            async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as probe:
                busy = (await probe.get("/metrics")).json()["total_requests"]
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            status = await anyio.to_thread.run_sync(server.wait, GRACE_S + 30)
            exit_s = time.monotonic() - signalled
            result = await load.result()
        finally:
            await load.aclose()

    counts = classify(result, signalled)
    reliability.record(
        "Shutdown",
        "SIGTERM under load",
        tried=(
            f"{CLIENTS} keep-alive clients sending /embed in a closed loop; SIGTERM after "
            f"{LOAD_BEFORE_SIGNAL_S:g} s; every attempt classed by when it was sent"
        ),
        amount=f"{result.attempts} attempts, {counts['sent']} sent before the signal",
        outcome=(
            f"before the signal: {counts['sent']} sent, {counts['answered_200']} answered 200, "
            f"{counts['answered_503']} 503 (sent within {READ_LAG_S:g} s of it), "
            f"{counts['unanswered']} unanswered; after it: {counts['late']} attempts, "
            f"{counts['late_503']} 503, {counts['late_refused']} refused/closed, "
            f"{counts['late_200']} 200 (within {READ_LAG_S:g} s); "
            f"exit {exit_s:.1f} s after the signal (grace {GRACE_S:g} s), status {status}"
        ),
    )
    report = f"{counts}; outcomes {result.outcomes}; exit {exit_s:.2f}s status {status}"
    print(report)
    assert busy > CLIENTS, f"the load never got going: {report}"
    assert status in (0, -signal.SIGTERM), f"{report}\n{server.log(4000)}"
    assert exit_s <= GRACE_S + EXIT_MARGIN_S, report
    assert counts["sent"] > CLIENTS and counts["late"] > 0, f"nothing to count: {report}"
    # sent = answered: each request the server took before the signal got a real answer.
    assert counts["unanswered"] == 0, report
    assert counts["answered_200"] + counts["answered_503"] == counts["sent"], report
    assert counts["refused_503_early"] == 0, report
    # New work after the signal is refused (503, or no connection), never served.
    assert counts["late_other"] == 0, report
    assert "Finished server process" in server.log(), server.log(4000)
