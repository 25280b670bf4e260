"""The real `openai` and `langchain_openai` clients against the real server on loopback.

Every embedding the clients return is compared with ``POST /embed`` of the same text on the
same server, so a wrong byte order, a row mix-up or a lost row fails.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from tokenizers import Tokenizer

from devkit.launcher import DEFAULT_MODEL, ServerProcess, models_dir, running_server
from embedserve.models.store import ModelStore
from tests.support import spread_texts

pytestmark = pytest.mark.integration

MIN_COSINE = 0.9999
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model_dir(exported_model: Path) -> Path:
    return exported_model


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the module, on a free loopback port."""
    with running_server(log_dir=tmp_path_factory.mktemp("openai-server")) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    """The official client pointed at the server; no retries, so errors surface at once."""
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S
    ) as openai_client:
        yield openai_client


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return spread_texts(12, seed=41, max_words=60)


def embed_each(server: ServerProcess, texts: list[str]) -> np.ndarray:
    """Reference rows from ``POST /embed``, one request per text."""
    rows = []
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as http:
        for text in texts:
            response = http.post("/embed", json={"text": text})
            assert response.status_code == 200, response.text
            rows.append(response.json()["embedding"])
    return np.asarray(rows, dtype=np.float32)


def assert_matches(got: list[list[float]], want: np.ndarray) -> None:
    """Row-wise cosine >= MIN_COSINE, and rows distinguishable so a mix-up would fail."""
    rows = np.asarray(got, dtype=np.float32)
    assert rows.shape == want.shape
    unit_want = want / np.linalg.norm(want, axis=1, keepdims=True)
    unit_got = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    similarity = np.sum(unit_got * unit_want, axis=1)
    worst = int(np.argmin(similarity))
    assert similarity[worst] >= MIN_COSINE, f"row {worst}: cosine {similarity[worst]:.6f}"
    cross = unit_want @ unit_want.T
    np.fill_diagonal(cross, -1.0)
    assert cross.max() < MIN_COSINE, "two test texts embed alike; a mix-up would pass"


def real_token_counts(model_dir: Path, texts: list[str]) -> list[int]:
    """Tokens per text from the model's own tokenizer (specials in, cut at its limit)."""
    manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
    assert manifest is not None
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest.max_tokens)
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


# -- openai ----------------------------------------------------------------------------
def test_openai_default_base64_matches_embed(
    client: openai.OpenAI, server: ServerProcess, texts: list[str]
) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input=texts)  # sends base64
    assert response.model == DEFAULT_MODEL
    assert [item.index for item in response.data] == list(range(len(texts)))
    assert all(len(item.embedding) == 384 for item in response.data)
    assert_matches([item.embedding for item in response.data], embed_each(server, texts))


def test_openai_float_matches_embed(
    client: openai.OpenAI, server: ServerProcess, texts: list[str]
) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input=texts, encoding_format="float")
    assert_matches([item.embedding for item in response.data], embed_each(server, texts))


def test_openai_explicit_base64_is_little_endian_float32(
    client: openai.OpenAI, server: ServerProcess, texts: list[str]
) -> None:
    # Asked for explicitly, the client hands the base64 strings through undecoded.
    response = client.embeddings.create(
        model=DEFAULT_MODEL, input=texts[:3], encoding_format="base64"
    )
    encoded = [item.embedding for item in response.data]
    assert all(isinstance(item, str) for item in encoded)
    rows = [np.frombuffer(base64.b64decode(item), dtype="<f4").tolist() for item in encoded]  # type: ignore[arg-type]
    assert_matches(rows, embed_each(server, texts[:3]))


def test_openai_usage_is_the_models_token_count(
    client: openai.OpenAI, model_dir: Path, texts: list[str]
) -> None:
    long_text = " ".join(["tokenisation"] * 400)  # far past MiniLM's 256-token limit
    inputs = [*texts[:4], long_text]
    counts = real_token_counts(model_dir, inputs)
    assert counts[-1] == 256
    one = client.embeddings.create(model=DEFAULT_MODEL, input=texts[0])
    many = client.embeddings.create(model=DEFAULT_MODEL, input=inputs)
    assert one.usage.prompt_tokens == one.usage.total_tokens == counts[0]
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(counts)


def test_openai_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = [model.id for model in client.models.list()]
    assert DEFAULT_MODEL in listed
    model = client.models.retrieve(DEFAULT_MODEL)
    assert model.id == DEFAULT_MODEL
    assert model.object == "model"


def test_openai_errors_surface_as_the_right_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="nope/not-a-model", input="hi")
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=DEFAULT_MODEL, input="")
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as token_ids:
        client.embeddings.create(model=DEFAULT_MODEL, input=[[101, 7592, 102]])
    assert "token-id input" in token_ids.value.message
    with pytest.raises(openai.BadRequestError) as dimensions:
        client.embeddings.create(model=DEFAULT_MODEL, input="hi", dimensions=128)
    assert dimensions.value.param == "dimensions"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope/not-a-model")


# -- langchain_openai ------------------------------------------------------------------
def test_langchain_embed_documents_and_query_match_embed(
    server: ServerProcess, texts: list[str]
) -> None:
    want = embed_each(server, texts)
    # Our own HTTP client, closed here: OpenAIEmbeddings never closes the one it would make.
    with openai.DefaultHttpxClient() as http_client:
        embedder = OpenAIEmbeddings(
            model=DEFAULT_MODEL,
            base_url=f"{server.base_url}/v1",
            api_key="unused",  # type: ignore[arg-type]
            check_embedding_ctx_length=False,  # send text, not tiktoken ids
            max_retries=0,
            timeout=TIMEOUT_S,
            http_client=http_client,
        )
        documents = embedder.embed_documents(texts)
        query = embedder.embed_query(texts[3])
    assert_matches(documents, want)
    assert_matches([query], want[3:4])
