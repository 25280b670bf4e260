"""Hostile and malformed input, in process: what a client can send that a well-behaved one
would not, and what must hold for every such request (a 4xx in the error shape, no load, no
file access outside the models directory, nothing of the server in the answer).

Requests are driven through the ASGI interface exactly as uvicorn would pass them (raw
paths decoded once, header bytes untouched), because httpx normalises away ``..`` segments
and refuses CR/LF in header values. The real server's share (sockets, RSS, slow clients) is
in tests/test_hostile_server.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import anyio
import numpy as np
import orjson
import pytest
from starlette.types import ASGIApp, Message

from embedserve.logs import JsonFormatter, TextFormatter
from embedserve.models.store import Manifest, ModelStore
from tests.conftest import Api, Serve
from tests.fakes import GatedRunner, fake_vector
from tests.leaks import assert_no_leak
from tests.reliability import Recorder

pytestmark = pytest.mark.anyio

AREA = "Hostile input"
# An error body is a sentence and a few fields; anything larger is an amplification.
MAX_ERROR_BODY = 16 * 1024
GENERATED_ID = re.compile(rb"[0-9a-f]{32}")


# -- driving the app as uvicorn would ------------------------------------------------------
@dataclass
class Answer:
    """One response: status, raw headers, body, and how many body messages were pulled."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    pulled: int

    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


async def call(
    app: ASGIApp,
    method: str,
    target: bytes,
    *,
    body: bytes | None = None,
    chunks: Sequence[bytes] | None = None,
    complete: bool = True,
    headers: Sequence[tuple[bytes, bytes]] = (),
    json: bool = True,
) -> Answer:
    """Send one request to `app` as uvicorn would: `target` is the raw request target (its
    path is percent-decoded once, as uvicorn does), `body` one message or `chunks` several.
    With `complete` false the client stalls after its chunks (a slow body); after the
    answer, ``receive`` reports a disconnect.
    """
    raw_path, _, query = target.partition(b"?")
    path = raw_path.decode("ascii")
    if "%" in path:
        path = unquote(path)
    parts = list(chunks) if chunks is not None else [body or b""]
    messages: collections.deque[Message] = collections.deque(
        {"type": "http.request", "body": part, "more_body": True} for part in parts
    )
    if complete:
        messages[-1]["more_body"] = False
    answered = asyncio.Event()
    sent: list[Message] = []
    pulled = 0

    async def receive() -> Message:
        nonlocal pulled
        if messages:
            pulled += 1
            return messages.popleft()
        await answered.wait()  # a stalled client, or one waiting for its answer
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    request_headers = [(b"host", b"test")]
    if json and (body is not None or chunks is not None):
        request_headers.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [*request_headers, *headers],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }
    with anyio.fail_after(20):
        try:
            await app(scope, receive, send)
        except Exception:
            # Starlette re-raises an unhandled error after its 500 went out, for the server
            # to log; uvicorn does, and so the answer is what counts here.
            if not answered.is_set():
                raise
    start = sent[0]
    assert start["type"] == "http.response.start"
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], list(start.get("headers", [])), payload, pulled)


def error_type(target: bytes, answer: Answer) -> str:
    """The error's type, after checking the body has exactly the documented error shape."""
    assert len(answer.body) <= MAX_ERROR_BODY, f"{len(answer.body)} byte error body"
    body = answer.json()
    if target.startswith(b"/v1/"):
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        kind = body["error"]["code"]
    else:
        assert set(body) <= {"error", "error_type", "details"}, body
        assert isinstance(body["error"], str) and body["error"]
        kind = body["error_type"]
    assert isinstance(kind, str) and kind
    return kind


def tally(statuses: Sequence[int]) -> str:
    """``400x12, 422x3``: a status count for the report."""
    counts = collections.Counter(statuses)
    return ", ".join(f"{status}x{n}" for status, n in sorted(counts.items()))


# -- file accesses -------------------------------------------------------------------------
# Audit events (PEP 578) that name a path; stat and lstat raise none, so they are wrapped.
_PATH_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "os.mkdir",
        "os.rmdir",
        "os.remove",
        "os.rename",
        "os.replace",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.utime",
        "os.chdir",
        "glob.glob",
        "pathlib.Path.glob",
        "pathlib.Path.rglob",
        "shutil.copyfile",
        "shutil.rmtree",
        "shutil.move",
    }
)


class FileAccess:
    """Records every path the process touches while `recording` is set.

    One audit hook is installed for the whole session (audit hooks cannot be removed), and
    it does nothing unless a test has switched recording on through `file_accesses`.
    """

    def __init__(self) -> None:
        self.recording = False
        self.seen: list[tuple[str, str]] = []

    def add(self, event: str, path: object) -> None:
        if isinstance(path, int):  # a file descriptor: its opening was recorded
            return
        if isinstance(path, str | bytes | os.PathLike):
            self.seen.append((event, os.path.abspath(os.fsdecode(path))))
        else:
            self.seen.append((event, repr(path)))

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.recording and event in _PATH_EVENTS and args:
            self.add(event, args[0])


_ACCESS = FileAccess()
sys.addaudithook(_ACCESS.hook)


@contextmanager
def file_accesses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """The paths touched (opened, listed, stat'ed, ...) inside the block, as (event, path)."""
    real_stat, real_lstat = os.stat, os.lstat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if _ACCESS.recording:
            _ACCESS.add("os.stat", path)
        return real_stat(path, *args, **kwargs)

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if _ACCESS.recording:
            _ACCESS.add("os.lstat", path)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    _ACCESS.seen = []
    _ACCESS.recording = True
    try:
        yield _ACCESS.seen
    finally:
        _ACCESS.recording = False
        monkeypatch.setattr(os, "stat", real_stat)
        monkeypatch.setattr(os, "lstat", real_lstat)


def inside_or_above(path: str, root: Path) -> bool:
    """`path` is `root`, under it, or one of its ancestors (which resolving `root` lstats)."""
    candidate = Path(path)
    return candidate.is_relative_to(root) or root.is_relative_to(candidate)


# -- malformed bodies ----------------------------------------------------------------------
# (label, JSON fragment put where a text goes, status on /embed and /embed/batch, on /v1).
FRAGMENTS: list[tuple[str, bytes, int, int]] = [
    ("invalid UTF-8 (0xff 0xfe)", b'"\xff\xfe"', 400, 400),
    ("truncated UTF-8 sequence", b'"ab\xe2\x82"', 400, 400),
    ("overlong UTF-8 for '/'", b'"\xc0\xaf"', 400, 400),
    ("UTF-8-encoded surrogate", b'"\xed\xa0\x80"', 400, 400),
    ("escaped lone surrogate", b'"x\\ud800"', 400, 400),
    ("raw NUL byte in a string", b'"a\x00b"', 400, 400),
    ("escaped NUL in a text", b'"a\\u0000b"', 200, 200),
    ("text of escaped NULs only", b'"\\u0000\\u0000"', 200, 200),
    ("1e999999", b"1e999999", 400, 400),
    ("-1e999999", b"-1e999999", 400, 400),
    ("10^100000 (100001-digit integer)", b"1" + b"0" * 100_000, 400, 400),
    ("300-digit integer", b"1" + b"0" * 300, 422, 400),
    ("1e-999999", b"1e-999999", 422, 400),
    ("NaN literal", b"NaN", 400, 400),
    ("nesting bomb: 100k arrays", b"[" * 100_000 + b"]" * 100_000, 400, 400),
    ("nesting bomb: 100k objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400, 400),
    ("1000-deep arrays, under the parser's limit", b"[" * 1000 + b"]" * 1000, 422, 400),
]
# Whole bodies: (label, body, status on every endpoint).
BODIES: list[tuple[str, bytes, int]] = [
    ("empty body", b"", 400),
    ("whitespace only", b" \r\n\t ", 400),
    ("invalid UTF-8 only", b"\xff\xfe\xfd", 400),
    ("UTF-8 BOM before the JSON", b'\xef\xbb\xbf{"text": "a"}', 400),
    ("UTF-16 JSON", '{"text": "a"}'.encode("utf-16"), 400),
    ("1000 NUL bytes", b"\x00" * 1000, 400),
    ("1e999999 as the body", b"1e999999", 400),
    ("nesting bomb as the body", b"[" * 100_000 + b"]" * 100_000, 400),
    ("null", b"null", 422),
    ("a JSON string", b'"text"', 422),
    ("a JSON array", b'[{"text": "a"}]', 422),
    ("200k unknown keys", orjson.dumps({f"k{i}": i for i in range(200_000)}), 422),
    (
        "1M-item list of numbers",
        b'{"text": 1, "texts": [' + b"1," * 999_999 + b'1], "input": 1}',
        422,
    ),
]
ENDPOINTS = (b"/embed", b"/embed/batch", b"/v1/embeddings")


def place(endpoint: bytes, fragment: bytes) -> bytes:
    """A request body for `endpoint` with `fragment` where its text goes."""
    if endpoint == b"/embed":
        return b'{"text": ' + fragment + b"}"
    if endpoint == b"/embed/batch":
        return b'{"texts": ["ok", ' + fragment + b"]}"
    return b'{"model": "fake/a", "input": ["ok", ' + fragment + b"]}"


async def test_malformed_bodies_are_4xx_in_the_error_shape(api: Api, reliability: Recorder) -> None:
    """Invalid UTF-8, NUL bytes, nesting bombs, huge numbers: 400/422 (400 under /v1), small
    error bodies, no load, and the server keeps answering; a NUL inside a text is a text."""
    cases: list[tuple[str, bytes, bytes, int]] = []
    for label, fragment, native, openai in FRAGMENTS:
        for endpoint in ENDPOINTS:
            expected = openai if endpoint.startswith(b"/v1/") else native
            cases.append((label, endpoint, place(endpoint, fragment), expected))
    for label, body, native in BODIES:
        for endpoint in ENDPOINTS:
            expected = 400 if endpoint.startswith(b"/v1/") else native
            cases.append((label, endpoint, body, expected))

    statuses: list[int] = []
    wrong: list[str] = []
    slowest = (0.0, "")
    largest = 0
    for label, endpoint, body, expected in cases:
        started = time.perf_counter()
        answer = await call(api.app, "POST", endpoint, body=body)
        elapsed = time.perf_counter() - started
        slowest = max(slowest, (elapsed, f"{label} on {endpoint.decode()}"))
        statuses.append(answer.status)
        assert_no_leak(answer.body)
        if answer.status != expected:
            wrong.append(f"{label} on {endpoint.decode()}: {answer.status} {answer.body[:200]!r}")
        elif answer.status >= 400:
            largest = max(largest, len(answer.body))
            error_type(endpoint, answer)
    nul_vectors = api.loader.backends["fake/a"].batches
    after = await call(api.app, "POST", b"/embed", body=b'{"text": "still serving"}')

    reliability.record(
        AREA,
        "Invalid UTF-8 / NUL / nesting bomb / huge numbers",
        tried=(
            "invalid and overlong UTF-8, surrogates, raw and escaped NUL, 1e999999, "
            "10^100000, NaN, 100k-deep array and object nesting, BOM, UTF-16, 200k keys, "
            "a 1M-item list, on /embed, /embed/batch, /v1/embeddings (in process)"
        ),
        amount=f"{len(cases)} requests ({len(FRAGMENTS) + len(BODIES)} cases x 3 endpoints)",
        outcome=(
            f"{tally(statuses)}; {len(wrong)} unexpected; largest error body {largest} B; "
            f"slowest {slowest[0] * 1000:.0f} ms ({slowest[1]}); loads: {api.loader.calls}"
        ),
    )
    assert not wrong, "\n".join(wrong)
    assert not [s for s in statuses if s >= 500]
    assert api.loader.calls == ["fake/a"]
    assert ["a\x00b"] in nul_vectors or any("a\x00b" in batch for batch in nul_vectors)
    assert after.status == 200
    np.testing.assert_allclose(after.json()["embedding"], fake_vector("still serving"), rtol=1e-6)


# -- bodies too large or too slow ----------------------------------------------------------
async def test_streamed_body_over_the_limit_is_413_and_never_held(serve: Serve) -> None:
    """Up to twice the limit, the rest is read and discarded so that the client gets its
    answer on a usable connection; beyond that, reading stops and the connection closes."""
    chunk = 64 * 1024
    limit = 1024 * 1024
    async with serve(max_request_bytes=limit) as api:
        for target in (b"/embed", b"/embed/batch", b"/v1/embeddings"):
            endless = [b'{"text": "'] + [b"x" * chunk] * 200  # 12.5 MiB, never finished
            answer = await call(api.app, "POST", target, chunks=endless, complete=False)
            assert answer.status == 413, answer.body
            assert error_type(target, answer) == "request_too_large"
            assert answer.header(b"connection") == [b"close"]
            assert answer.pulled <= 2 * limit // chunk + 2  # twice the limit, one chunk more
            assert_no_leak(answer.body)

            a_bit_over = [b'{"text": "'] + [b"x" * chunk] * 24  # 1.5 MiB
            answer = await call(api.app, "POST", target, chunks=a_bit_over)
            assert answer.status == 413, answer.body
            assert answer.header(b"connection") == []  # read to its end: the connection lives
            assert answer.pulled == len(a_bit_over)


@pytest.mark.parametrize(
    ("length", "expect", "pulled", "closes"),
    [
        (b"10485761", b"", 1, False),  # over by a byte: read to the end, discarded
        (b"10485761", b"100-continue", 0, True),  # the client waits: refused unasked
        (b"20971521", b"", 0, True),  # past twice the limit: not worth reading
        (b"1000000000000", b"", 0, True),
        (b"9" * 30, b"", 0, True),
        (b"1" * 100_000, b"", 0, True),  # past 4300 digits Python refuses int()
    ],
    ids=["limit+1", "limit+1, Expect", "2x limit+1", "1e12", "30 digits", "100000 digits"],
)
async def test_declared_length_over_the_limit_is_413(
    api: Api, length: bytes, expect: bytes, pulled: int, closes: bool
) -> None:
    headers = [(b"content-length", length)]
    if expect:
        headers.append((b"expect", expect))
    answer = await call(api.app, "POST", b"/embed", chunks=[b'{"text": "a"}'], headers=headers)
    assert answer.status == 413
    assert error_type(b"/embed", answer) == "request_too_large"
    assert answer.pulled == pulled
    assert answer.header(b"connection") == ([b"close"] if closes else [])


async def test_body_that_stalls_is_408_at_the_body_timeout(serve: Serve) -> None:
    timeout_s = 0.2
    async with serve(body_timeout_s=timeout_s) as api:
        for target in (b"/embed", b"/v1/embeddings"):
            started = time.monotonic()
            answer = await call(api.app, "POST", target, chunks=[b'{"te'], complete=False)
            elapsed = time.monotonic() - started
            assert answer.status == 408, answer.body
            assert error_type(target, answer) == "body_timeout"
            assert answer.header(b"connection") == [b"close"]
            assert timeout_s <= elapsed < timeout_s + 5  # cut at the deadline, not later
            assert_no_leak(answer.body)
        assert api.loader.calls == ["fake/a"]


async def test_body_timeout_covers_the_body_only_not_the_wait_for_the_model(
    serve: Serve,
) -> None:
    """A request whose body arrived in time is answered however long its batch takes."""
    runner = GatedRunner(open_=True)
    async with serve(body_timeout_s=0.1, run_sync=runner) as api:
        runner.open = False
        request = asyncio.ensure_future(
            call(api.app, "POST", b"/embed", body=b'{"text": "held past the body timeout"}')
        )
        with anyio.fail_after(10):
            await runner.wait_for_waiting(1)
        await asyncio.sleep(0.3)  # real time: the body deadline runs on the loop's clock
        runner.open = True
        runner.release(1)
        answer = await request
    assert answer.status == 200, answer.body


# -- a million characters ------------------------------------------------------------------
async def test_million_character_text_is_refused_or_truncated_on_request(
    api: Api, reliability: Recorder
) -> None:
    limit = api.settings.max_text_chars
    million = "word " * 200_000
    wide = "\U0001f600" * 1_000_000  # 4 MB of UTF-8
    answers: list[tuple[str, Answer]] = []
    started = time.perf_counter()
    for label, text in (("ascii", million), ("emoji", wide)):
        for truncate in (False, True):
            for target, body in (
                (b"/embed", {"text": text, "truncate": truncate}),
                (b"/embed/batch", {"texts": ["short", text], "truncate": truncate}),
                (b"/v1/embeddings", {"model": "fake/a", "input": text, "truncate": truncate}),
            ):
                answer = await call(api.app, "POST", target, body=orjson.dumps(body))
                answers.append((f"{label} truncate={truncate} {target.decode()}", answer))
    blank = await call(
        api.app, "POST", b"/embed", body=orjson.dumps({"text": " " * 1_000_000, "truncate": True})
    )
    elapsed = time.perf_counter() - started
    embedded = [t for batch in api.loader.backends["fake/a"].batches for t in batch]

    refused = [a.status for label, a in answers if "truncate=False" in label]
    cut_statuses = [a.status for label, a in answers if "truncate=True" in label]
    reliability.record(
        AREA,
        "Million-character text",
        tried=(
            "a 1,000,000-character text (ASCII, and 4-byte emoji: 4 MB) on /embed, "
            "/embed/batch, /v1/embeddings, without and with truncate; 1M spaces with truncate"
        ),
        amount=f"{len(answers) + 1} requests, {elapsed:.2f} s",
        outcome=(
            f"without truncate: {tally(refused)}; with truncate: {tally(cut_statuses)}; "
            f"longest text embedded {max(map(len, embedded))} chars "
            f"(MAX_TEXT_LENGTH {limit}); 1M spaces truncated: {blank.status}"
        ),
    )
    for label, answer in answers:
        assert_no_leak(answer.body)
        if "truncate=False" in label:
            expected = 400 if "/v1/" in label else 422
            assert answer.status == expected, (label, answer.body)
            message = answer.json()["error"]
            message = message["message"] if isinstance(message, dict) else message
            assert "1000000 characters" in message and "truncate" in message, message
        else:
            assert answer.status == 200, (label, answer.body)
    cut = next(a for label, a in answers if label == "ascii truncate=True /embed").json()
    assert cut["text_length"] == limit and cut["truncated"] is True
    assert max(map(len, embedded)) == limit
    assert blank.status == 422


# -- model names that reach for files ------------------------------------------------------
HOSTILE_NAMES = [
    "../etc/passwd",
    "../../../../../../../../etc/passwd",
    "fake/../../etc/passwd",
    "..",
    ".",
    "fake/./a",
    "fake/a/..",
    "/etc/passwd",
    "/",
    "//etc/passwd",
    "C:\\Windows\\win.ini",
    "fake\\..\\..\\etc\\passwd",
    "%2e%2e%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252fetc%252fpasswd",
    "..%2f..%2fetc%2fpasswd",
    "..%5c..%5cwin.ini",
    "%c0%ae%c0%ae/etc/passwd",
    "\uff0e\uff0e/etc/passwd",  # fullwidth full stops
    "fake\u2215..\u2215etc",  # division slash
    "fake/a\x00",
    "\x00",
    "fake/a\x00/../../etc/passwd",
    "fake/a\n",
    "fake/a\r\nX-Injected: 1",
    " fake/a",
    "fake/a ",
    "fake/a.",
    "~/.ssh/id_rsa",
    "~root",
    ".cache/x",
    ".staging/x",
    "fake//a",
    "fake/a/",
    "file:///etc/passwd",
    "http://127.0.0.1/x",
    "${HOME}",
    "$(id)",
    "a" * 300,
    "/".join(["a"] * 150),
]
# Request targets for /models/{name} that a client sends as they are (not re-encoded).
RAW_TARGETS = [
    b"../../../../etc/passwd",
    b"%2e%2e/%2e%2e/etc/passwd",
    b"%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"%252e%252e%252fetc%252fpasswd",
    b"..%2f..%2f..%2fetc%2fpasswd",
    b"%2fetc%2fpasswd",
    b"fake/a%00",
    b"%00",
    b"fake%2f..%2f..%2fetc",
]


async def _name_requests(app: ASGIApp, name: str) -> list[tuple[bytes, Answer]]:
    """Every way to name a model: the three embed bodies and the two model paths."""
    bodies = (
        (b"/embed", {"text": "hi", "model_name": name}),
        (b"/embed/batch", {"texts": ["hi"], "model_name": name}),
        (b"/v1/embeddings", {"input": "hi", "model": name}),
        (b"/v1/embeddings", {"input": "hi", "model": name, "dimensions": 8}),
    )
    answers = [
        (target, await call(app, "POST", target, body=orjson.dumps(body)))
        for target, body in bodies
    ]
    encoded = quote(name, safe="/").encode("ascii")
    for prefix in (b"/models/", b"/v1/models/"):
        answers.append((prefix, await call(app, "GET", prefix + encoded)))
    return answers


def _check_refused(target: bytes, answer: Answer, name: str, refused: int) -> str | None:
    """Why `answer` is wrong for a refused name, or None."""
    expected = 404 if target.endswith(b"/models/") else refused
    if target.endswith(b"/models/") and answer.status == 200 and name.endswith("\n"):
        # Starlette's route pattern ends in '$', which matches before a final newline, so
        # /models/fake/a%0A is /models/fake/a: the valid name without the newline.
        served = answer.json()
        return None if name[:-1] in (served.get("model_name"), served.get("id")) else name
    if answer.status != expected:
        return f"{name!r} on {target.decode()}: {answer.status} {answer.body[:200]!r}"
    kind = error_type(target, answer)
    if target.endswith(b"/models/"):
        # not_found: no route matches (a path with a newline inside it)
        return None if kind in ("model_not_found", "not_found") else f"{name!r}: {kind}"
    wanted = "invalid_model_name" if refused == 400 else "model_not_allowed"
    return None if kind == wanted else f"{name!r} on {target.decode()}: {kind}"


async def test_traversal_and_unlisted_names_load_nothing_and_touch_no_file(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability: Recorder
) -> None:
    models = tmp_path / "models"
    present = "local/present"
    ModelStore(models).model_dir(present).mkdir(parents=True)
    ModelStore(models).write_manifest(
        models / present,
        Manifest(present, 8, "mean", True, 256, "test", onnx_sha256=""),
    )
    root = models.resolve()
    wrong: list[str] = []
    statuses: list[int] = []
    touched: list[tuple[str, str, str]] = []

    def judge(label: str, answers: list[Any], seen: Any, echoed: str, status: int) -> None:
        """Note what answering `label` touched; check every answer refused it with `status`."""
        touched.extend((label, event, path) for event, path in seen)
        for target, answer in answers:
            statuses.append(answer.status)
            assert_no_leak(answer.body, paths=[models], echoed=[echoed])
            if (why := _check_refused(target, answer, label, status)) is not None:
                wrong.append(why)

    # Without an allow-list: every hostile name is invalid (400; 404 on the model paths).
    async with serve() as api:
        await _name_requests(api.app, "fake/a")  # warm up lazy imports before recording
        for name in HOSTILE_NAMES:
            with file_accesses(monkeypatch) as seen:
                answers = await _name_requests(api.app, name)
            judge(name, answers, seen, name, 400)
        for raw in RAW_TARGETS:
            with file_accesses(monkeypatch) as seen:
                answers = [
                    (prefix, await call(api.app, "GET", prefix + raw))
                    for prefix in (b"/models/", b"/v1/models/")
                ]
            judge(raw.decode(), answers, seen, unquote(raw.decode()), 400)
        # The control: a valid name that is not there is looked for, inside the models dir.
        with file_accesses(monkeypatch) as control:
            missing = await call(
                api.app, "POST", b"/embed", body=b'{"text": "hi", "model_name": "no/such"}'
            )
        control = list(control)
        loads_open = list(api.loader.calls)

    # With an allow-list: names outside it are refused before anything is looked up, even
    # one present in the models directory and catalogue names.
    unlisted = [present, "fake/b", "BAAI/bge-small-en-v1.5", "FAKE/A", "fake/c"]
    async with serve(allowed_models=["fake/a"]) as api:
        await _name_requests(api.app, "fake/a")
        for name in unlisted:
            with file_accesses(monkeypatch) as seen:
                answers = await _name_requests(api.app, name)
            judge(name, answers, seen, name, 403)
        loads_listed = list(api.loader.calls)

    outside = [t for t in touched if not inside_or_above(t[2], root)]
    # Only a name that was served (Starlette's /models/fake/a%0A, see _check_refused) may
    # have been looked up; a refused one is refused before any lookup.
    served = {name for name in HOSTILE_NAMES if name.endswith("\n")}
    refused_touched = [t for t in touched if t[0] not in served]
    reliability.record(
        AREA,
        "Path traversal and allow-list",
        tried=(
            "model names with ../, absolute and Windows paths, %2e%2e%2f and double-encoded "
            "traversal, NUL, CR/LF, fullwidth dots, reserved dirs, 300-char names; raw "
            "traversal request paths; names outside ALLOWED_MODELS (catalogue, on disk) on "
            "/embed, /embed/batch, /v1/embeddings, /models/{name}, /v1/models/{name}; file "
            "accesses recorded with sys.addaudithook plus os.stat/os.lstat"
        ),
        amount=(
            f"{len(HOSTILE_NAMES)} hostile names, {len(RAW_TARGETS)} raw paths, "
            f"{len(unlisted)} unlisted names: {len(statuses)} requests"
        ),
        outcome=(
            f"{tally(statuses)}; {len(wrong)} unexpected; load attempts beyond the required "
            f"model: {len(loads_open) - 1 + len(loads_listed) - 1}; file accesses: "
            f"{len(refused_touched)} for refused names, {len(outside)} outside the models "
            f"dir; control name: "
            f"{len(control)} accesses, all inside"
        ),
    )
    assert not wrong, "\n".join(wrong)
    assert not outside, outside[:20]
    assert not refused_touched, refused_touched[:20]
    assert loads_open == ["fake/a"] and loads_listed == ["fake/a"]
    # The recorder works: the control name was looked for, and only under the models dir.
    assert missing.status == 404
    assert any(path.startswith(str(root)) for _, path in control), control
    assert all(inside_or_above(path, root) for _, path in control), control


# -- X-Request-ID --------------------------------------------------------------------------
INJECTED_IDS = [
    b"abc\r\nSet-Cookie: evil=1",
    b"abc\nX-Injected: 1",
    b"abc\rX-Injected: 1",
    b"abc\r\n\r\n<html>injected body",
    b"a\x00b",
    b"a\tb",
    b"\x1b[31mred",
    b"caf\xc3\xa9",
    b"\xff\xfe\xfd",
    b"x" * 129,
    b"x" * 65_536,
    b"%0d%0aSet-Cookie:evil=1",
    b'"quoted"',
    b"<script>alert(1)</script>",
    b"",
    b" ",
]


async def test_request_id_injection_is_replaced_in_the_header_and_the_log(
    api: Api, caplog: pytest.LogCaptureFixture, reliability: Recorder
) -> None:
    caplog.set_level(logging.INFO, logger="embedserve.access")
    formatters = (TextFormatter("%(message)s"), JsonFormatter())
    replaced = 0
    problems: list[str] = []
    cases = [(given, b"/embed") for given in INJECTED_IDS]
    cases += [(b"fine", b"/embed%0d%0a2099-01-01 INFO embedserve.access: forged")]
    for given, target in cases:
        caplog.clear()
        answer = await call(
            api.app,
            "POST",
            target,
            body=b'{"text": "hi"}',
            headers=[(b"x-request-id", given)],
        )
        echoed = answer.header(b"x-request-id")
        if len(echoed) != 1 or (not GENERATED_ID.fullmatch(echoed[0]) and echoed != [given]):
            problems.append(f"{given[:40]!r}: echoed {echoed!r}")
            continue
        if echoed[0] != given:
            replaced += 1
        for key, value in answer.headers:
            if any(c in key + value for c in (b"\r", b"\n", b"\x00")):
                problems.append(f"{given[:40]!r}: response header {key!r}: {value[:60]!r}")
        records = [r for r in caplog.records if r.name == "embedserve.access"]
        if len(records) != 1 or getattr(records[0], "request_id", None) != echoed[0].decode():
            problems.append(f"{given[:40]!r}: access records {len(records)}")
            continue
        for formatter in formatters:
            line = formatter.format(records[0])
            if "\n" in line or "\r" in line or "Set-Cookie" in line or "X-Injected" in line:
                problems.append(f"{given[:40]!r}: log line {line[:200]!r}")
        assert_no_leak(answer.body)
    kept = await call(
        api.app, "POST", b"/embed", body=b'{"text": "hi"}', headers=[(b"x-request-id", b"a-1.b:2")]
    )

    reliability.record(
        AREA,
        "X-Request-ID injection",
        tried=(
            "X-Request-ID with CR/LF (header splitting, forged body), NUL, TAB, ESC, "
            "non-ASCII and invalid UTF-8, 129 B and 64 KiB, quotes and HTML; a path with an "
            "encoded CR/LF and a forged log line"
        ),
        amount=f"{len(cases)} requests",
        outcome=(
            f"{replaced}/{len(INJECTED_IDS)} unsafe ids replaced by a fresh uuid; "
            f"{len(problems)} injected header or log lines; text and JSON log lines single-line"
        ),
    )
    assert not problems, "\n".join(problems)
    assert replaced == len(INJECTED_IDS)
    assert kept.header(b"x-request-id") == [b"a-1.b:2"]


# -- no leaks ------------------------------------------------------------------------------
HERE = Path(__file__).resolve()
API_KEY = "sk-hostile-0123456789abcdefXYZ"
OTHER_KEY = "sk-other-9876543210fedcbaQRS"


async def test_error_bodies_leak_no_trace_path_or_key(
    serve: Serve, tmp_path: Path, reliability: Recorder
) -> None:
    """Every error answer, including failures whose exceptions carry paths and tracebacks,
    is free of stack traces, server paths and API keys."""
    poison = (
        f'Traceback (most recent call last):\n  File "{HERE}", line 1, in <module>\n'
        f"OSError: cannot open {tmp_path}/models/fake/b/model.onnx; key {API_KEY}"
    )
    good = [(b"authorization", f"Bearer {API_KEY}".encode())]
    answers: list[tuple[bytes, Answer]] = []
    async with serve(api_keys=[API_KEY], debug=True, max_request_bytes=4096) as api:

        async def send(method: str, target: bytes, body: bytes | None = None, **kw: Any) -> None:
            headers = kw.pop("headers", good)
            answers.append(
                (target, await call(api.app, method, target, body=body, headers=headers, **kw))
            )

        api.loader.fail["fake/b"] = OSError(poison)
        for target in (b"/embed", b"/v1/embeddings", b"/models", b"/metrics"):
            for headers in (
                [],
                [(b"authorization", f"Bearer {OTHER_KEY}".encode())],
                [(b"authorization", API_KEY.encode())],
                [(b"authorization", f"Basic {API_KEY}".encode())],
            ):
                await send("POST" if b"embed" in target else "GET", target, b"{}", headers=headers)
        await send("POST", b"/embed", b'{"text": "a", "model_name": "fake/b"}')
        await send("POST", b"/v1/embeddings", b'{"input": "a", "model": "fake/b"}')
        api.loader.backends["fake/a"].fail_next = RuntimeError(poison)
        await send("POST", b"/embed", b'{"text": "a"}')
        api.loader.backends["fake/a"].fail_next = RuntimeError(poison)
        await send("POST", b"/v1/embeddings", b'{"input": "a", "model": "fake/a"}')

        async def explode(*args: Any, **kwargs: Any) -> Any:
            raise KeyError(poison)

        real_embed = api.registry.embed
        api.registry.embed = explode  # type: ignore[method-assign]
        await send("POST", b"/embed", b'{"text": "a"}')
        await send("POST", b"/v1/embeddings", b'{"input": "a", "model": "fake/a"}')
        api.registry.embed = real_embed  # type: ignore[method-assign]
        for target, body in (
            (b"/embed", b"{"),
            (b"/embed", b'{"text": 1}'),
            (b"/embed", b'{"text": "a", "model_name": "../../etc/passwd"}'),
            (b"/embed", b'{"text": "a", "model_name": "no/such"}'),
            (b"/embed", b'{"text": "' + b"x" * 5000 + b'"}'),
            (b"/v1/embeddings", b'{"input": [1, 2], "model": "fake/a"}'),
            (b"/v1/embeddings", b'{"input": "a", "model": "fake/a", "dimensions": 3}'),
        ):
            await send("POST", target, body)
        form = [*good, (b"content-type", b"application/x-www-form-urlencoded")]
        await send("POST", b"/embed", b"text=a", json=False, headers=form)
        huge_type = [*good, (b"content-type", b"text/" + b"x" * 60_000)]  # not echoed whole
        await send("POST", b"/embed", b"{}", json=False, headers=huge_type)
        await send("GET", b"/nowhere/../../etc/passwd")
        await send("DELETE", b"/embed")
        await send("GET", b"/models/..%2f..%2fetc%2fpasswd")
        await send("GET", b"/v1/models/no/such")

    statuses = [answer.status for _, answer in answers]
    leaks = 0
    for _, answer in answers:
        try:
            assert_no_leak(answer.body, secrets=[API_KEY, OTHER_KEY], paths=[tmp_path])
        except AssertionError:
            leaks += 1
    reliability.record(
        AREA,
        "No leaks in error bodies",
        tried=(
            "every error kind (401 missing/wrong/malformed key, 400, 403-404 names, 405, 413, "
            "415, 422, 500 backend and unexpected errors, 503 failed load) with DEBUG on; the "
            "failing exceptions carry a traceback, server paths and the API key"
        ),
        amount=f"{len(answers)} error responses",
        outcome=f"{tally(statuses)}; {leaks} with a stack trace, server path or API key",
    )
    for target, answer in answers:
        assert answer.status >= 400, (target, answer.body)
        error_type(target, answer)
        assert_no_leak(answer.body, secrets=[API_KEY, OTHER_KEY], paths=[tmp_path])
    assert {401, 400, 404, 405, 413, 415, 422, 500, 503} <= set(statuses)
