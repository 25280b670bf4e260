"""The real text-embeddings-inference (TEI) clients against the real server on loopback.

`huggingface_hub`'s `InferenceClient`, LangChain's `HuggingFaceEndpointEmbeddings`,
LlamaIndex's `TextEmbeddingsInference` and Haystack's Hugging Face API embedders, each given
the server's base URL and nothing else. Every vector they return is compared with
``POST /v1/embeddings`` of the same texts on the same server, one text and a batch; each
client also meets one error. Which requests each client really sent is read from the
server's access log (JSON lines), so the client table of docs/api.md names the paths they call.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest

# Before Haystack is imported: its telemetry would otherwise try to reach the internet.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"

from haystack import Document
from haystack.utils import Secret
from haystack_integrations.components.embedders.huggingface_api import (
    HuggingFaceAPIDocumentEmbedder,
    HuggingFaceAPITextEmbedder,
)
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from langchain_huggingface import HuggingFaceEndpointEmbeddings
from llama_index.embeddings.text_embeddings_inference import (
    TextEmbeddingsInference,
)

from devkit.launcher import DEFAULT_MODEL, ServerProcess, running_server
from tests.support import spread_texts
from tests.test_openai_clients import assert_matches

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
LOG_WAIT_S = 10.0  # access lines are written in batches (logs.WRITE_INTERVAL_S)


@pytest.fixture(scope="module")
def server(
    exported_model: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real server for the module, logging JSON lines so its access log can be read."""
    env = {"LOG_FORMAT": "json", "ACCESS_LOG": "true"}
    with running_server(env, log_dir=tmp_path_factory.mktemp("tei-server")) as proc:
        yield proc


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return spread_texts(8, seed=15, max_words=50)


@pytest.fixture(scope="module")
def reference(server: ServerProcess, texts: list[str]) -> np.ndarray:
    """The texts' vectors from ``POST /v1/embeddings``."""
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as http:
        response = http.post(
            "/v1/embeddings",
            json={"model": DEFAULT_MODEL, "input": texts, "encoding_format": "float"},
        )
    assert response.status_code == 200, response.text
    return np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


class CallLog:
    """The requests the server logged since the last `take`, read from its access log.

    `take` sends a marker request (``GET /tei-client-mark/<id>``, answered 404) and returns
    every access line logged before the marker's own, as ``"METHOD /path STATUS"``.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.offset = 0
        self.take()  # what came before (the reference, earlier tests) is not this test's

    def take(self) -> list[str]:
        marker = f"/tei-client-mark/{uuid.uuid4().hex}"
        httpx.get(self.server.base_url + marker, timeout=TIMEOUT_S)
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            text = self.server.log()
            lines = [self._access(line) for line in text[self.offset :].splitlines()]
            calls = [line for line in lines if line is not None]
            ends = [i for i, call in enumerate(calls) if call.startswith(f"GET {marker} ")]
            if ends:
                self.offset = len(text)
                return calls[: ends[0]]
            assert time.monotonic() < deadline, f"no access line for {marker} in the log"
            time.sleep(0.05)

    @staticmethod
    def _access(line: str) -> str | None:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(entry, dict) or entry.get("logger") != "embedserve.access":
            return None
        return f"{entry['method']} {entry['path']} {entry['status']}"


@pytest.fixture
def calls(server: ServerProcess) -> CallLog:
    return CallLog(server)


# -- huggingface_hub ----------------------------------------------------------------------
def test_huggingface_hub_feature_extraction(
    server: ServerProcess, texts: list[str], reference: np.ndarray, calls: CallLog
) -> None:
    client = InferenceClient(base_url=server.base_url, timeout=TIMEOUT_S)
    one = client.feature_extraction(texts[0])
    batch = client.feature_extraction(texts)
    assert one.shape == (1, 384)
    assert_matches(one.tolist(), reference[:1])
    assert_matches(batch.tolist(), reference)
    assert calls.take() == ["POST / 200", "POST / 200"]

    with pytest.raises(HfHubHTTPError) as refused:
        client.feature_extraction("   ")
    assert refused.value.response is not None
    assert refused.value.response.status_code == 422
    assert calls.take() == ["POST / 422"]


# -- langchain-huggingface ------------------------------------------------------------------
def test_langchain_huggingface_endpoint_embeddings(
    server: ServerProcess, texts: list[str], reference: np.ndarray, calls: CallLog
) -> None:
    embedder = HuggingFaceEndpointEmbeddings(model=server.base_url)
    assert_matches([embedder.embed_query(texts[0])], reference[:1])
    assert_matches(embedder.embed_documents(texts), reference)
    assert calls.take() == ["POST / 200", "POST / 200"]

    with pytest.raises(HfHubHTTPError) as refused:
        embedder.embed_documents(["fine", ""])
    assert refused.value.response is not None
    assert refused.value.response.status_code == 422
    assert calls.take() == ["POST / 422"]


# -- llama-index-embeddings-text-embeddings-inference --------------------------------------
def test_llama_index_text_embeddings_inference(
    server: ServerProcess, texts: list[str], reference: np.ndarray, calls: CallLog
) -> None:
    embedder = TextEmbeddingsInference(
        model_name=DEFAULT_MODEL, base_url=server.base_url, timeout=TIMEOUT_S
    )
    assert_matches([embedder.get_query_embedding(texts[0])], reference[:1])
    assert_matches(embedder.get_text_embedding_batch(texts), reference)
    assert calls.take() == ["POST /embed 200", "POST /embed 200"]

    # The client reads the body without looking at the status: TEI's error object (ours)
    # has no row 0, so the 422 surfaces as a KeyError, as it does against TEI itself.
    with pytest.raises(KeyError):
        embedder.get_text_embedding("")
    assert calls.take() == ["POST /embed 422"]


# -- Haystack (huggingface-api-haystack) ---------------------------------------------------
def test_haystack_huggingface_api_embedders(
    server: ServerProcess, texts: list[str], reference: np.ndarray, calls: CallLog
) -> None:
    api_params = {"url": server.base_url}
    text_embedder = HuggingFaceAPITextEmbedder(
        api_type="text_embeddings_inference", api_params=api_params
    )
    document_embedder = HuggingFaceAPIDocumentEmbedder(
        api_type="text_embeddings_inference", api_params=api_params, progress_bar=False
    )
    one = text_embedder.run(text=texts[0])["embedding"]
    documents = document_embedder.run(documents=[Document(content=text) for text in texts])
    assert_matches([one], reference[:1])
    assert_matches([doc.embedding for doc in documents["documents"]], reference)
    assert calls.take() == ["POST / 200", "POST / 200"]

    with pytest.raises(HfHubHTTPError) as refused:
        text_embedder.run(text="")
    assert refused.value.response is not None
    assert refused.value.response.status_code == 422
    assert calls.take() == ["POST / 422"]


# -- /embed_all and /tokenize with the real model -----------------------------------------
def test_embed_all_mean_pools_to_the_embedding(
    server: ServerProcess, texts: list[str], reference: np.ndarray
) -> None:
    """MiniLM's embedding is the normalised mean of its token vectors (specials included):
    the token vectors of the packed graph must give back the /v1/embeddings vectors."""
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as http:
        tokens = http.post("/tokenize", json={"inputs": texts[:3]})
        rows = http.post("/embed_all", json={"inputs": texts[:3]})
    assert tokens.status_code == 200, tokens.text
    assert rows.status_code == 200, rows.text
    counts = [len(row) for row in tokens.json()]
    assert [len(row) for row in rows.json()] == counts
    pooled = [np.asarray(row, dtype=np.float32).mean(axis=0) for row in rows.json()]
    assert_matches([vector.tolist() for vector in pooled], reference[:3])


# -- API keys: each client sends the key it is given -----------------------------------------
def test_each_client_sends_its_api_key(
    exported_model: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    key = "tei-clients-" + "k" * 20
    env = {"API_KEYS": key}
    with running_server(env, log_dir=tmp_path_factory.mktemp("tei-keys")) as keyed:
        url = keyed.base_url
        hub = InferenceClient(base_url=url, api_key=key, timeout=TIMEOUT_S)
        assert hub.feature_extraction("a fox").shape == (1, 384)
        langchain = HuggingFaceEndpointEmbeddings(model=url, huggingfacehub_api_token=key)
        assert len(langchain.embed_query("a fox")) == 384
        llama = TextEmbeddingsInference(model_name=DEFAULT_MODEL, base_url=url, auth_token=key)
        assert len(llama.get_query_embedding("a fox")) == 384
        haystack = HuggingFaceAPITextEmbedder(
            api_type="text_embeddings_inference",
            api_params={"url": url},
            token=Secret.from_token(key),
        )
        assert len(haystack.run(text="a fox")["embedding"]) == 384
        with pytest.raises(HfHubHTTPError) as refused:
            InferenceClient(base_url=url, timeout=TIMEOUT_S).feature_extraction("a fox")
        assert refused.value.response is not None
        assert refused.value.response.status_code == 401
