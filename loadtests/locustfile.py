"""Locust load test for embedserve: single-text, batch and mixed traffic over a committed corpus.

User classes (name them after the options to run only some; none named runs both, weighted):

- ``SingleTextUser``: ``POST /embed`` with one corpus text per request, the main traffic.
- ``BatchUser``: ``POST /embed/batch`` with ``--batch-min``..``--batch-max`` texts, capped at
  the server's ``MAX_BATCH_SIZE`` (asked of the server at test start unless
  ``--max-batch-size`` is given).
- both together are the mixed profile; ``--single-weight`` / ``--batch-weight`` set the share of
  users of each class (default 7:1).
- ``IngestUser`` + ``QueryUser`` are the sidecar profile (run only when named): an ingestion
  job's ``POST /embed/batch`` of ``--sidecar-batch`` texts with ``X-Priority: bulk``, and
  search queries, one text each with ``X-Priority: interactive``, half the users each. Their
  rows are named ``sidecar ingest`` and ``sidecar query``, so each group's latency is
  reported on its own (README, "Priority lanes").

Options (each also read from the environment variable in brackets):
``--model`` [EMBEDSERVE_MODEL] model_name to send (default: none, the server's default model);
``--corpus`` [LOADTEST_CORPUS] ``mixed`` or ``short`` (see `loadtests.corpus`);
``--batch-min`` / ``--batch-max`` [LOADTEST_BATCH_MIN / _MAX] texts per batch request (8, 64);
``--max-batch-size`` [LOADTEST_MAX_BATCH_SIZE] the server's limit (0: ask the server);
``--single-weight`` / ``--batch-weight`` [LOADTEST_SINGLE_WEIGHT / _BATCH_WEIGHT];
``--think-time-ms`` [LOADTEST_THINK_TIME_MS] mean pause between a user's requests (0: none,
each user sends its next request as soon as the last is answered).

Every 200 answer's ``X-Queue-Time`` and ``X-Inference-Time`` headers (ms) become rows of type
``SERVER`` named ``<path> queue_time`` and ``<path> inference_time``, with the header value as
their response time; their "Average Content Size" is the mean number of texts per request.
They are logged into their own rows only, not the Aggregated row, so its request count, RPS
and response times stay the client's. Any answer other than 200 is a failure named
``HTTP <status> <error_type>`` (``error_type`` from the JSON error body).

Run it against any deployment::

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 64 -r 16 -t 60s SingleTextUser
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastResponse
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # locust puts only this file's directory on the path
    sys.path.insert(0, str(ROOT))

from loadtests.corpus import CORPORA, load  # noqa: E402

logger = logging.getLogger("embedserve.loadtest")

SERVER_DEFAULT_MAX_BATCH_SIZE = 32  # the server's MAX_BATCH_SIZE default, if it cannot be asked
PROBE_TIMEOUT_S = 30.0
_LIMIT = re.compile(rb"limit of (\d+) \(MAX_BATCH_SIZE\)")


@dataclass
class Config:
    """What the users send; built once per process from the parsed options."""

    texts: list[str]
    model: str = ""
    batch_min: int = 8
    batch_max: int = 64
    max_batch_size: int = 0  # 0: not known yet (asked of the server at test start)
    sidecar_batch: int = 32
    think_time_s: float = 0.0

    def batch_range(self) -> tuple[int, int]:
        """Least and most texts per batch request, within the server's limit."""
        high = min(self.batch_max, self.max_batch_size or SERVER_DEFAULT_MAX_BATCH_SIZE)
        return min(self.batch_min, high), high

    def body(self, **fields: Any) -> dict[str, Any]:
        """A request body with `fields`, plus ``model_name`` when a model is chosen."""
        return {**fields, "model_name": self.model} if self.model else fields


_config: Config | None = None
_user_ids = itertools.count()


def config() -> Config:
    """The process's Config (the ``mixed`` corpus and defaults until `init` has run)."""
    global _config
    if _config is None:
        _config = Config(texts=load("mixed"))
    return _config


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("embedserve")
    group.add_argument("--model", env_var="EMBEDSERVE_MODEL", default="", help="model_name to send")
    group.add_argument(
        "--corpus", env_var="LOADTEST_CORPUS", choices=CORPORA, default="mixed", help="texts"
    )
    group.add_argument("--batch-min", env_var="LOADTEST_BATCH_MIN", type=int, default=8)
    group.add_argument("--batch-max", env_var="LOADTEST_BATCH_MAX", type=int, default=64)
    group.add_argument(
        "--max-batch-size",
        env_var="LOADTEST_MAX_BATCH_SIZE",
        type=int,
        default=0,
        help="the server's MAX_BATCH_SIZE (0: ask the server at test start)",
    )
    group.add_argument("--single-weight", env_var="LOADTEST_SINGLE_WEIGHT", type=int, default=7)
    group.add_argument("--batch-weight", env_var="LOADTEST_BATCH_WEIGHT", type=int, default=1)
    group.add_argument(
        "--sidecar-batch",
        env_var="LOADTEST_SIDECAR_BATCH",
        type=int,
        default=32,
        help="texts per IngestUser request (capped at the server's MAX_BATCH_SIZE)",
    )
    group.add_argument(
        "--think-time-ms",
        env_var="LOADTEST_THINK_TIME_MS",
        type=float,
        default=0.0,
        help="mean pause between a user's requests (0: none)",
    )


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _config
    options = environment.parsed_options
    if options is None:  # used as a library: keep the defaults
        return
    for flag in ("batch_min", "batch_max", "single_weight", "batch_weight"):
        if getattr(options, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if options.batch_min > options.batch_max:
        raise ValueError("--batch-min must not exceed --batch-max")
    _config = Config(
        texts=load(options.corpus),
        model=options.model,
        batch_min=options.batch_min,
        batch_max=options.batch_max,
        max_batch_size=max(0, options.max_batch_size),
        think_time_s=max(0.0, options.think_time_ms) / 1000,
    )
    SingleTextUser.weight = options.single_weight
    BatchUser.weight = options.batch_weight
    _config.sidecar_batch = max(1, options.sidecar_batch)
    if not getattr(options, "user_classes", None):
        # No class named: the mixed profile. The sidecar classes run only when named.
        for user_class in (IngestUser, QueryUser):
            if user_class in environment.user_classes:
                environment.user_classes.remove(user_class)
            environment.user_classes_by_name.pop(user_class.__name__, None)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    settings = config()
    batching = {BatchUser, IngestUser} & set(environment.user_classes)
    if isinstance(environment.runner, MasterRunner) or not batching:
        return
    if not settings.max_batch_size:
        asked = ask_max_batch_size(environment.host or "", settings)
        if asked is None:
            logger.warning(
                "could not learn the server's MAX_BATCH_SIZE; assuming %d (use --max-batch-size)",
                SERVER_DEFAULT_MAX_BATCH_SIZE,
            )
        settings.max_batch_size = asked or SERVER_DEFAULT_MAX_BATCH_SIZE
    low, high = settings.batch_range()
    logger.info("batch requests carry %d-%d texts", low, high)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    # Locust rewrites its --csv files once a second and not again at exit, so they would miss
    # the last second of the run; every user has stopped now: let the writer run once more.
    options = environment.parsed_options
    if getattr(options, "csv_prefix", None) and not isinstance(environment.runner, WorkerRunner):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


def ask_max_batch_size(host: str, settings: Config) -> int | None:
    """The server's MAX_BATCH_SIZE, or `settings.batch_max` if it is at least that; None if
    the server does not say.

    Sends one batch of ``batch_max + 1`` copies of a one-word text: a server that allows it
    embeds the word once per model batch (identical texts are computed once); one that does
    not answers 422 naming its limit.
    """
    body = settings.body(texts=["x"] * (settings.batch_max + 1))
    request = urllib.request.Request(
        f"{host.rstrip('/')}/embed/batch",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return settings.batch_max
    except urllib.error.HTTPError as exc:
        found = _LIMIT.search(exc.read())
        return int(found[1]) if found else None
    except (OSError, ValueError):
        return None


def error_type(response: FastResponse) -> str:
    """The ``error_type`` of an error answer, or what went wrong when there is none."""
    if not response.status_code:
        return f"no response ({type(getattr(response, 'error', None)).__name__})"
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return "non-JSON body"
    found = body.get("error_type") if isinstance(body, dict) else None
    return str(found) if found else "no error_type"


class EmbedUser(FastHttpUser):
    """A closed-loop client (or paced by ``--think-time-ms``) with its own random stream."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = config()
        self.rng = random.Random(next(_user_ids))

    def wait_time(self) -> float:
        think = self.settings.think_time_s
        return self.rng.uniform(0, 2 * think) if think else 0.0

    def texts(self, count: int) -> list[str]:
        """`count` corpus texts drawn at random (distinct within the request)."""
        return self.rng.sample(self.settings.texts, count)

    def post(
        self,
        path: str,
        body: dict[str, Any],
        count: int,
        *,
        name: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send `body` to `path` (reported as `name`, default the path); record failures and
        the server's timing headers."""
        name = name or path
        post = self.client.post(path, json=body, headers=headers, name=name, catch_response=True)
        with post as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code} {error_type(response)}")
                return
            queue_ms = response.headers.get("X-Queue-Time")
            inference_ms = response.headers.get("X-Inference-Time")
            if queue_ms is None or inference_ms is None:
                response.failure("no X-Queue-Time / X-Inference-Time header")
                return
        # Logged into their own rows only (not RequestStats.log_request, which would also
        # count them in the Aggregated row): the total stays the client's requests.
        stats = self.environment.stats
        stats.get(f"{name} queue_time", "SERVER").log(float(queue_ms), count)
        stats.get(f"{name} inference_time", "SERVER").log(float(inference_ms), count)


class SingleTextUser(EmbedUser):
    """``POST /embed`` with one text per request."""

    weight = 7

    @task
    def embed(self) -> None:
        [text] = self.texts(1)
        self.post("/embed", self.settings.body(text=text), 1)


class BatchUser(EmbedUser):
    """``POST /embed/batch`` with a random number of texts in the batch range."""

    weight = 1

    @task
    def embed_batch(self) -> None:
        count = self.rng.randint(*self.settings.batch_range())
        self.post("/embed/batch", self.settings.body(texts=self.texts(count)), count)


class IngestUser(EmbedUser):
    """Sidecar profile: an ingestion job, ``POST /embed/batch`` in the bulk lane."""

    @task
    def ingest(self) -> None:
        settings = self.settings
        count = min(
            settings.sidecar_batch, settings.max_batch_size or SERVER_DEFAULT_MAX_BATCH_SIZE
        )
        body = settings.body(texts=self.texts(count))
        self.post("/embed/batch", body, count, name="sidecar ingest", headers=BULK)


class QueryUser(EmbedUser):
    """Sidecar profile: a search client, one text a request in the interactive lane."""

    @task
    def query(self) -> None:
        [text] = self.texts(1)
        body = self.settings.body(text=text)
        self.post("/embed", body, 1, name="sidecar query", headers=INTERACTIVE)


BULK = {"X-Priority": "bulk"}
INTERACTIVE = {"X-Priority": "interactive"}
