"""Property-based fuzzing of the whole HTTP API from its own ``/openapi.json`` (schemathesis).

Every operation the document lists (schemathesis leaves out ``GET /openapi.json`` itself,
which tests/test_openapi.py covers) gets schema-valid (positive) and schema-breaking
(negative) requests, generated deterministically (Hypothesis ``derandomize``), and every
answer is checked by schemathesis (status documented, body and headers as documented,
invalid data refused, valid data not refused) and by `tests.leaks` (no stack trace, server
path or API key). Each documented path is also sent every undocumented method (405). The
main run is in-process (ASGI, the fake loader, lifespan included), with API keys off and on;
a smaller run goes to the real server with the real model.

Failures are counted rather than raised one at a time, so the report shows how many cases
broke which check; the test then fails listing one reproduction (a curl line) per kind.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi
from starlette.applications import Starlette

from devkit.launcher import DEFAULT_MODEL, running_server
from embedserve.engine.registry import ModelRegistry
from embedserve.engine.wiring import policy_from
from embedserve.http.app import create_app
from embedserve.models.store import ModelStore
from embedserve.settings import Settings
from tests.conftest import CATALOGUE
from tests.fakes import FakeLoader
from tests.leaks import ROOT, assert_no_leak, find_leaks
from tests.reliability import Recorder

AREA = "Hostile input"
API_KEY = "fuzz-" + "k" * 27
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}
# Small enough that the keyed run spends its bucket and meets documented 429s as well.
RATE_LIMIT_REQUESTS = 60
# Known names, so that the model path parameters reach the 200 answers too (generated names
# are almost never a real model).
KNOWN_MODELS = ("fake/a", "fake/b", "BAAI/bge-small-en-v1.5")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


# TEI's routes answer 413 for more inputs than MAX_BATCH_SIZE, as TEI does: a refusal too.
REJECTION_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422"]
REJECTION_STATUSES += ["428", "429", "5xx"]
CHECKS = {"checks": {"negative_data_rejection": {"expected-statuses": REJECTION_STATUSES}}}


def fuzz_settings(max_examples: int) -> hypothesis.settings:
    """Deterministic: the same cases on every run and machine (CI reproduces a failure)."""
    return hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,  # a case's time is the app's, not the generator's
        phases=[Phase.generate],  # failures are counted, not raised: nothing to shrink
        # Generation time says nothing about the server, and CI's 2 shared cores run the
        # load tests next to this one: a slow draw must not fail the run.
        suppress_health_check=[HealthCheck.too_slow],
    )


@dataclass
class Tally:
    """What a run sent and saw: cases, operations, statuses, and every problem by kind."""

    cases: int = 0
    operations: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    crashes: Counter[str] = field(default_factory=Counter)  # no answer to check at all
    violations: Counter[str] = field(default_factory=Counter)
    leaks: Counter[str] = field(default_factory=Counter)
    repro: dict[str, str] = field(default_factory=dict)  # one reproduction per kind

    def answered(self, status: int) -> None:
        self.cases += 1
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors += 1

    def note(self, counter: Counter[str], kind: str, repro: str) -> None:
        counter[kind] += 1
        self.repro.setdefault(kind, repro[:600])

    def outcome(self) -> str:
        raised = sum(self.crashes.values())
        errors = f"{self.server_errors} 5xx" + (f" ({raised} raised)" if raised else "")
        return (
            f"{errors}; {sum(self.violations.values())} schema/status violations; "
            f"{sum(self.leaks.values())} leaks; {len(self.statuses)} distinct statuses "
            f"({', '.join(str(s) for s in sorted(self.statuses))})"
        )

    def problems(self) -> str:
        kinds = [*self.crashes.items(), *self.violations.items(), *self.leaks.items()]
        return "\n".join(f"{count}x {kind}:\n  {self.repro[kind]}" for kind, count in kinds)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def sent_texts(case: Case) -> list[str]:
    """Every string the case sends: the server may quote these back without leaking."""
    parts = (case.path_parameters, case.query, case.headers, case.body)
    return [text for part in parts for text in _strings(part)]


def strategies(
    operation: APIOperation, headers: Mapping[str, str] | None, known_models: Sequence[str]
) -> Any:
    """Positive and negative cases; for a model path parameter, also the known models."""
    fixed = dict(headers) if headers else None
    options = [
        operation.as_strategy(generation_mode=mode, headers=fixed)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    if "{model_name}" in operation.path:
        options += [
            operation.as_strategy(path_parameters={"model_name": name}, headers=fixed)
            for name in known_models
        ]
    return st.one_of(options)


def fuzz(
    schema: Any,
    tally: Tally,
    *,
    max_examples: int,
    headers: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    paths: Sequence[Path] = (),
    known_models: Sequence[str] = KNOWN_MODELS,
) -> None:
    """Send up to `max_examples` cases to every operation of `schema`, into `tally`."""
    extra = dict(headers) if headers else None
    for result in schema.get_all_operations():
        operation = result.ok()  # an operation the document cannot describe fails here
        tally.operations.add(operation.label)

        @fuzz_settings(max_examples)
        @given(case=strategies(operation, headers, known_models))
        def run(case: Case) -> None:
            try:
                response = case.call(headers=extra)
            except Exception as exc:
                # In-process, an unhandled error reaches here after its 500 went out
                # (Starlette re-raises for the server to log); over HTTP, a dropped connection.
                tally.answered(500)
                kind = f"{case.operation.label}: raised {type(exc).__name__}"
                tally.note(tally.crashes, kind, f"{case.as_curl_command()}\n  -> {exc!r}")
                return
            tally.answered(response.status_code)
            repro = f"{case.as_curl_command()}\n  -> {response.status_code} "
            try:
                case.validate_response(response, headers=extra)
            except FailureGroup as group:
                for failure in group.exceptions:
                    kind = f"{case.operation.label}: {failure.code} {failure.title}"
                    tally.note(tally.violations, kind, repro + response.text)
            found = find_leaks(
                response.content, secrets=secrets, paths=paths, echoed=sent_texts(case)
            )
            for leak in found:
                kind = f"{case.operation.label}: leaks {leak}"
                tally.note(tally.leaks, kind, repro + "(hidden)")

        run()


def sweep_methods(client: Any, schema: Any, tally: Tally) -> None:
    """Every documented path with every other method: 405, ``Allow``, the error shape."""
    documented: dict[str, set[str]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        path = operation.path.replace("{model_name}", "fake/a").replace("{name}", "x")
        documented.setdefault(path, set()).add(operation.method.upper())
    for path, methods in documented.items():
        for method in sorted(set(METHODS) - methods):
            response = client.request(method, path)
            tally.answered(response.status_code)
            kind = f"{method} {path}: undocumented method"
            repro = f"{response.status_code} {dict(response.headers)} {response.text}"
            allowed = {m.strip() for m in response.headers.get("allow", "").split(",")}
            if (
                response.status_code != 405
                or not methods <= allowed
                or not is_error(path, response)
            ):
                tally.note(tally.violations, kind, repro)
            if find_leaks(response.content):
                tally.note(tally.leaks, kind, "(hidden)")


def is_error(path: str, response: Any) -> bool:
    """Whether the body is the error shape of `path` (OpenAI's under /v1)."""
    if response.headers.get("content-type") != "application/json":
        return False
    body = response.json()
    if path.startswith("/v1/"):
        inner = body.get("error") if isinstance(body, dict) else None
        return isinstance(inner, dict) and {"message", "type", "code"} <= set(inner)
    return isinstance(body, dict) and {"error", "error_type"} <= set(body)


def build_app(tmp_path: Path, **overrides: Any) -> Starlette:
    """The app over the fake loader (as the ``serve`` fixture builds it; lifespan not run)."""
    values: dict[str, Any] = {
        "models_dir": tmp_path / "models",
        "required_models": ["fake/a"],
        "shutdown_grace_s": 1.0,
        **overrides,
    }
    settings = Settings.build(**values)
    registry = ModelRegistry(
        store=ModelStore(settings.models_dir),
        loader=FakeLoader(),
        policy=policy_from(settings),
        catalogue=CATALOGUE,
        allowed=settings.allowed_models,
        required=settings.required_models,
        request_timeout_s=settings.request_timeout_s,
    )
    return create_app(settings, registry)


def load_in_process(app: Starlette, headers: Mapping[str, str] | None = None) -> Any:
    """The app's own document, fetched through ASGI; schemathesis starts the app's lifespan
    on the first request and keeps it running until `asgi.shutdown_lifespans`."""
    return schemathesis.openapi.from_asgi(
        "/openapi.json",
        app,
        config=schemathesis.Config.from_dict(CHECKS),
        headers=dict(headers or {}),
    )


@pytest.mark.reliability
def test_fuzz_in_process(tmp_path: Path, reliability: Recorder) -> None:
    """Positive and negative cases for every operation, API keys off and on: no 5xx, every
    answer documented, nothing leaked."""
    tally = Tally()
    models = tmp_path / "models"
    started = time.perf_counter()
    try:
        open_app = build_app(tmp_path)
        schema = load_in_process(open_app)
        fuzz(schema, tally, max_examples=150, paths=[models])
        with asgi.get_client(open_app) as client:
            sweep_methods(client, schema, tally)
        asgi.shutdown_lifespans()

        keyed = {"api_keys": [API_KEY], "enable_rate_limit": True}
        keyed_app = build_app(tmp_path, rate_limit_per_minute=RATE_LIMIT_REQUESTS, **keyed)
        schema = load_in_process(keyed_app, AUTHORIZED)
        fuzz(schema, tally, max_examples=15, secrets=[API_KEY], paths=[models])
        fuzz(schema, tally, max_examples=25, headers=AUTHORIZED, secrets=[API_KEY], paths=[models])
    finally:
        asgi.shutdown_lifespans()
    seconds = time.perf_counter() - started

    reliability.record(
        AREA,
        "Schemathesis fuzzing (in-process)",
        tried="every operation of /openapi.json, positive and negative cases (derandomized), "
        "API keys off, then on (no key / valid key, rate limit on), plus every undocumented "
        "method; schemathesis' checks and a leak check on every answer",
        amount=f"{tally.cases} cases, {len(tally.operations)} operations x 3 runs, {seconds:.1f} s",
        outcome=tally.outcome(),
    )
    assert tally.server_errors == 0, tally.problems()
    assert not tally.violations and not tally.leaks, tally.problems()
    assert {200, 400, 401, 404, 405, 422, 429} <= set(tally.statuses), tally.statuses


@pytest.mark.reliability
@pytest.mark.integration
def test_fuzz_real_server(exported_model: Path, reliability: Recorder) -> None:
    """A smaller run against the real server and model over loopback HTTP."""
    tally = Tally()
    started = time.perf_counter()
    with running_server({"ALLOWED_MODELS": DEFAULT_MODEL}) as server:
        schema = schemathesis.openapi.from_url(
            f"{server.base_url}/openapi.json",
            config=schemathesis.Config.from_dict({"request-timeout": 30, **CHECKS}),
        )
        fuzz(schema, tally, max_examples=50, known_models=[DEFAULT_MODEL, "BAAI/bge-small-en-v1.5"])
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            sweep_methods(client, schema, tally)
    seconds = time.perf_counter() - started

    reliability.record(
        AREA,
        "Schemathesis fuzzing (real server)",
        tried="every operation of the real server's /openapi.json with the real model "
        "(ALLOWED_MODELS set), positive and negative cases (derandomized), plus every "
        "undocumented method; schemathesis' checks and a leak check on every answer",
        amount=f"{tally.cases} cases, {len(tally.operations)} operations, {seconds:.1f} s",
        outcome=tally.outcome(),
    )
    assert tally.server_errors == 0, tally.problems()
    assert not tally.violations and not tally.leaks, tally.problems()


# -- the leak check itself (tests/leaks.py), so that "0 leaks" above means something ------------
def test_the_leak_check_finds_traces_paths_and_keys(tmp_path: Path) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        trace = traceback.format_exc()
    assert find_leaks(orjson.dumps({"error": trace}))  # quotes escaped inside JSON
    assert find_leaks(f"no such model at {ROOT / 'models' / 'x'}")
    assert find_leaks(f"cannot read {tmp_path}/models/x", paths=[tmp_path])
    assert find_leaks(b'{"error": "at registry.py\\", line 42"}')
    assert find_leaks('{"error": "key ' + API_KEY + '"}', secrets=[API_KEY])
    with pytest.raises(AssertionError) as refused:
        assert_no_leak("key " + API_KEY, secrets=[API_KEY])
    assert API_KEY not in str(refused.value), "the failure message must not leak the key"


def test_the_leak_check_passes_clean_and_echoed_bodies() -> None:
    assert_no_leak(b'{"error": "model \'x/y\' not found", "error_type": "model_not_found"}')
    assert_no_leak("model 'Traceback' not found", echoed=["Traceback"])
    assert_no_leak("", secrets=[""])
