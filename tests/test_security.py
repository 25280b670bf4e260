"""Security with API keys on: who gets in, how keys are compared, and rate limits per key.

The endpoints are enumerated from the app's own routes (and cross-checked against the served
/openapi.json), so a route added later is covered without editing this file; a route whose
path parameter has no example here fails the test until one is added. Refusals are checked
against the real server; the comparison is checked in-process, where `hmac.compare_digest`
can be observed, by the path taken rather than by timing.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from devkit.launcher import DEFAULT_MODEL, running_server
from embedserve.http.middleware.auth import EXEMPT_PATHS, ApiKeyAuth
from embedserve.http.route_table import routes
from tests.reliability import Recorder

KEY_A = "sk-sec-Alpha0123456789abcdefXYZ"
KEY_B = "sk-sec-Bravo0123456789abcdefXYZ"
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

# An example value for every path parameter a route may have (by its name).
PATH_EXAMPLES = {"model_name": DEFAULT_MODEL, "name": "swagger-ui.css"}
# A valid body for every POST route, so that with a key each one answers 2xx (and without
# one, a 401 cannot be mistaken for a validation error).
BODIES: dict[str, Any] = {
    "/embed": {"text": "hello"},
    "/embed/batch": {"texts": ["hello", "world"]},
    "/v1/embeddings": {"input": "hello", "model": DEFAULT_MODEL},
    "/": {"inputs": "hello"},
    "/embed_all": {"inputs": "hello"},
    "/tokenize": {"inputs": "hello"},
    "/decode": {"ids": [101, 7592, 102]},
}
_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# Each way of not presenting a valid key: (name, headers, query string).
VARIANTS: list[tuple[str, dict[str, str], str]] = [
    ("missing key", {}, ""),
    ("wrong key", bearer("sk-sec-Wrong00000000000000000000"), ""),
    ("key in another case", bearer(KEY_A.swapcase()), ""),
    ("prefix of a key", bearer(KEY_A[:-1]), ""),
    ("key with a suffix", bearer(KEY_A + "0"), ""),
    ("key in the query string", {}, f"api_key={KEY_A}&key={KEY_A}&access_token={KEY_A}"),
    ("key in X-API-Key", {"X-API-Key": KEY_A}, ""),
    ("key as Basic credentials", {"Authorization": f"Basic {KEY_A}"}, ""),
]


def endpoints() -> list[tuple[str, str, str]]:
    """(method, route path, concrete path) for every method of every route the app has."""
    found = []
    for route in routes():
        assert isinstance(route, Route), f"{route!r}: teach this test about this kind of route"
        missing = set(_PARAM.findall(route.path)) - set(PATH_EXAMPLES)
        assert not missing, f"{route.path}: add an example for {missing} to PATH_EXAMPLES"
        concrete = _PARAM.sub(lambda m: PATH_EXAMPLES[m.group(1)], route.path)
        for method in sorted(route.methods or ()):
            found.append((method, route.path, concrete))
    return found


def spec_path(route_path: str) -> str:
    """A route's path as OpenAPI writes it (no converters)."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", route_path)


def send(
    client: httpx.Client,
    method: str,
    path: str,
    headers: dict[str, str],
    query: str = "",
) -> httpx.Response:
    url = f"{path}?{query}" if query else path
    body = BODIES.get(path) if method == "POST" else None
    return client.request(method, url, headers=headers, json=body)


def refusal_problem(response: httpx.Response, method: str, path: str) -> str | None:
    """What is wrong with `response` as a 401 refusal, or None if it is one."""
    if response.status_code != 401:
        return f"{response.status_code}"
    if not response.headers.get("WWW-Authenticate", "").startswith('Bearer realm="embedserve"'):
        return "no WWW-Authenticate challenge"
    if method == "HEAD":
        return None
    body = response.json()
    if path.startswith("/v1/"):
        ok = body["error"]["type"] == "authentication_error"
    else:
        ok = set(body) == {"error", "error_type"} and body["error_type"].endswith("_api_key")
    if not ok:
        return f"body {body}"
    if KEY_A in response.text or KEY_A.swapcase() in response.text:
        return "the key is echoed"
    return None


@pytest.mark.integration
@pytest.mark.reliability
def test_every_endpoint_but_liveness_and_readiness_needs_a_valid_key(
    exported_model: Any, reliability: Recorder
) -> None:
    env = {"API_KEYS": f"{KEY_A},{KEY_B}", "ENABLE_RATE_LIMIT": "false"}
    guarded = [e for e in endpoints() if e[1] not in EXEMPT_PATHS]
    exempt = [e for e in endpoints() if e[1] in EXEMPT_PATHS]
    # Paths no route has, and a method no route takes: refused before routing reveals them.
    extras = [("GET", "/no-such-path", "/no-such-path"), ("OPTIONS", "/embed", "/embed")]
    problems: list[str] = []
    refusals = tried = 0
    started = time.monotonic()
    with (
        running_server(env) as server,
        httpx.Client(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client,
    ):
        spec = client.get("/openapi.json", headers=bearer(KEY_A))
        assert spec.status_code == 200, spec.text
        documented = set(spec.json()["paths"])
        for method, _, path in guarded + extras:
            for variant, headers, query in VARIANTS:
                tried += 1
                response = send(client, method, path, headers, query)
                problem = refusal_problem(response, method, path)
                if problem is None:
                    refusals += 1
                else:
                    problems.append(f"{method} {path} with {variant}: {problem}")
        accepted = {
            (method, path, key[:9]): send(client, method, path, bearer(key)).status_code
            for method, _, path in guarded
            for key in (KEY_A, KEY_B)
        }
        probes = {(m, p): send(client, m, p, {}).status_code for m, _, p in exempt}
        log = server.log()
    seconds = time.monotonic() - started
    reliability.record(
        "Security",
        "Every endpoint needs a key",
        tried=(
            f"{len(guarded)} method+path pairs from the app's routes (+ an unknown path and "
            f"OPTIONS) x {len(VARIANTS)} ways without a valid key: "
            + ", ".join(v[0] for v in VARIANTS)
        ),
        amount=f"{tried} requests, {seconds:.0f} s (real server)",
        outcome=(
            f"{refusals}/{tried} refused 401 with a Bearer challenge; "
            f"{sum(200 <= s < 300 for s in accepted.values())}/{len(accepted)} accepted with "
            f"a valid key; {len(probes)} liveness/readiness probes answered without one"
        ),
    )
    assert not problems, problems[:20]
    assert refusals == tried
    assert all(200 <= status < 300 for status in accepted.values()), accepted
    assert all(status == 200 for status in probes.values()), probes
    assert {p for _, p, _ in exempt} == {"/health", "/ready"}
    # Every documented path is a route this test enumerated (the spec hides none from it).
    assert documented <= {spec_path(route_path) for _, route_path, _ in guarded + exempt}
    for key in (KEY_A, KEY_B, KEY_A.swapcase()):
        assert key not in log


# -- the comparison ------------------------------------------------------------------------
def recorded_comparisons(
    monkeypatch: pytest.MonkeyPatch, keys: list[str], presented: list[str]
) -> list[tuple[int, list[tuple[int, int, bool]]]]:
    """For each presented key, the status and the `compare_digest` calls it caused
    (lengths of both arguments, and the result)."""
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest
    calls: list[tuple[int, int, bool]] = []

    def recording(a: bytes, b: bytes) -> bool:
        result = real(a, b)
        calls.append((len(a), len(b), result))
        return result

    monkeypatch.setattr(hmac, "compare_digest", recording)
    app = Starlette(
        routes=[Route("/x", lambda request: PlainTextResponse("ok"))],
        middleware=[Middleware(ApiKeyAuth, keys=keys)],
    )
    results = []

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        with anyio.fail_after(10):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for key in presented:
                    calls.clear()
                    status = (await client.get("/x", headers=bearer(key))).status_code
                    results.append((status, list(calls)))

    anyio.run(run)
    return results


def differ_at(key: str, index: int) -> str:
    """`key` with the character at `index` replaced by another printable one."""
    replacement = "0" if key[index] != "0" else "1"
    return key[:index] + replacement + key[index + 1 :]


@pytest.mark.reliability
def test_the_comparison_path_does_not_depend_on_where_a_key_differs(
    monkeypatch: pytest.MonkeyPatch, reliability: Recorder
) -> None:
    keys = [KEY_A, KEY_B, "sk-sec-Charlie0123456789abcdef"]
    presented = {
        "right key (first)": KEY_A,
        "right key (last)": keys[-1],
        "differs at the first byte": differ_at(KEY_A, 0),
        "differs at the last byte": differ_at(KEY_A, len(KEY_A) - 1),
        "differs in the middle": differ_at(KEY_B, len(KEY_B) // 2),
        "shorter by one": KEY_A[:-1],
    }
    results = dict(
        zip(
            presented,
            recorded_comparisons(monkeypatch, keys, list(presented.values())),
            strict=True,
        )
    )
    shapes = {name: [(a, b) for a, b, _ in calls] for name, (_, calls) in results.items()}
    statuses = {name: status for name, (status, _) in results.items()}
    distinct = {tuple(shape) for shape in shapes.values()}
    reliability.record(
        "Security",
        "Constant-time comparison",
        tried=(
            f"hmac.compare_digest recorded for {len(presented)} presented keys against "
            f"{len(keys)} configured: " + ", ".join(presented)
        ),
        amount=f"{sum(len(s) for s in shapes.values())} comparisons",
        outcome=(
            f"{len(distinct)} distinct call pattern(s): every key compared to all "
            f"{len(keys)} digests, each of 32 bytes, whatever matched or where it differed; "
            "no wall-clock timing involved"
        ),
    )
    assert statuses == {
        "right key (first)": 200,
        "right key (last)": 200,
        "differs at the first byte": 401,
        "differs at the last byte": 401,
        "differs in the middle": 401,
        "shorter by one": 401,
    }
    assert len(distinct) == 1, shapes
    assert shapes["differs at the first byte"] == [(32, 32)] * len(keys)
    # The comparisons really saw the keys: a match shows up where, and only where, it is.
    assert [m for _, _, m in results["right key (last)"][1]] == [False, False, True]
    assert not any(m for _, _, m in results["differs at the last byte"][1])


# -- rate limits per key ------------------------------------------------------------------
LIMIT = 5


@pytest.mark.integration
@pytest.mark.reliability
def test_rate_limits_hold_per_key_not_per_address(
    exported_model: Any, reliability: Recorder
) -> None:
    env = {
        "API_KEYS": f"{KEY_A},{KEY_B}",
        "ENABLE_RATE_LIMIT": "true",
        "RATE_LIMIT_REQUESTS": str(LIMIT),  # one token back every 12 s: none during the test
        "TRUSTED_PROXIES": "127.0.0.1",  # so X-Forwarded-For gives two client addresses
    }
    here = {"X-Forwarded-For": "198.51.100.1"}
    there = {"X-Forwarded-For": "198.51.100.2"}
    body = {"text": "hello"}

    def post(client: httpx.Client, key: str | None, origin: dict[str, str]) -> httpx.Response:
        headers = {**origin, **(bearer(key) if key else {})}
        return client.post("/embed", json=body, headers=headers)

    started = time.monotonic()
    with (
        running_server(env) as server,
        httpx.Client(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client,
    ):
        # Refused requests spend nothing: a flood without a key or with a wrong one first.
        unauthenticated = [post(client, None, here).status_code for _ in range(3 * LIMIT)]
        unauthenticated += [post(client, "sk-sec-x" * 3, here).status_code for _ in range(LIMIT)]
        a_here = [post(client, KEY_A, here) for _ in range(LIMIT - 1)]
        a_there = [post(client, KEY_A, there) for _ in range(2)]  # same key, other address
        b_here = [post(client, KEY_B, here) for _ in range(LIMIT)]  # other key, same address
        b_spent = post(client, KEY_B, there)
        # Access lines are written in batches (logs.WRITE_INTERVAL_S): wait for the last ones.
        deadline = time.monotonic() + 10
        log = server.log()
        while "client=198.51.100.2" not in log and time.monotonic() < deadline:
            time.sleep(0.05)
            log = server.log()
    seconds = time.monotonic() - started
    a_codes = [r.status_code for r in a_here + a_there]
    b_codes = [r.status_code for r in b_here]
    a_refused = a_there[-1]
    reliability.record(
        "Security",
        "Rate limit per key",
        tried=(
            f"RATE_LIMIT_REQUESTS={LIMIT}, two keys, one key from two client addresses "
            "(X-Forwarded-For via a trusted proxy), after a flood of unauthenticated requests"
        ),
        amount=f"{len(unauthenticated) + len(a_codes) + len(b_codes) + 1} requests, "
        f"{seconds:.0f} s (real server)",
        outcome=(
            f"key A: {a_codes} (from 2 addresses, one bucket), Retry-After "
            f"{a_refused.headers.get('Retry-After')}; key B at the same time: {b_codes}, then "
            f"{b_spent.status_code}; {unauthenticated.count(401)}/{len(unauthenticated)} "
            "unauthenticated refused 401 without spending"
        ),
    )
    assert unauthenticated == [401] * len(unauthenticated)
    assert a_codes == [200] * LIMIT + [429]
    assert a_refused.json()["error_type"] == "rate_limited"
    assert 1 <= int(a_refused.headers["Retry-After"]) <= 60 // LIMIT + 1
    assert a_refused.headers["RateLimit-Remaining"] == "0"
    assert b_codes == [200] * LIMIT  # key A's empty bucket did not touch key B's
    assert [r.headers["RateLimit-Remaining"] for r in b_here] == ["4", "3", "2", "1", "0"]
    assert b_spent.status_code == 429
    # The server did see two client addresses: the shared bucket is the key's, not an address's.
    assert "client=198.51.100.1" in log and "client=198.51.100.2" in log
