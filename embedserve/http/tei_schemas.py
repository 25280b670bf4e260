"""Request and response bodies of the text-embeddings-inference (TEI) routes, as TEI's router
defines them, with what embedserve accepts of each field stated in its schema.

Unknown fields are ignored, as TEI's deserialiser ignores them. Handlers check what the
types cannot (`tei_api`); these models also describe the bodies for /openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictInt,
    WithJsonSchema,
)

from embedserve.http.schemas import TEXTS_SCHEMA, whole_number

# Token ids are u32 in TEI; ids outside the model's vocabulary decode to nothing.
MAX_TOKEN_ID = 2**32 - 1
ID_ROW_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
}
IDS_SCHEMA: dict[str, Any] = {
    "anyOf": [ID_ROW_SCHEMA, {"type": "array", "items": ID_ROW_SCHEMA, "minItems": 1}]
}
# /tokenize takes any string, empty ones included (they are the special tokens alone).
ANY_TEXTS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ]
}
NO_PROMPTS = "Only null: no model here has prompts (any other value is 422)"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TEIEmbedRequest(_Request):
    """``POST /embed`` (with ``inputs``) and ``POST /``: TEI's embed request."""

    # Any: checked by `schemas.string_or_list`, so token ids get a message of their own.
    inputs: Annotated[Any, WithJsonSchema(TEXTS_SCHEMA)] = Field(
        description="A string or an array of at most MAX_BATCH_SIZE strings; none blank"
    )
    normalize: StrictBool = Field(
        True,
        description="Scale each vector to unit length; false gives the model's own output "
        "(already unit length for a model whose manifest normalises)",
    )
    truncate: StrictBool | None = Field(
        None, description="Cut texts over MAX_TEXT_LENGTH instead of 422 (null: false)"
    )
    truncation_direction: Literal["right", "Right"] = Field(
        "right", description="Only right: texts past the token limit are cut at their end"
    )
    dimensions: Annotated[StrictInt, Field(ge=1), BeforeValidator(whole_number)] | None = Field(
        None, description="Must equal the model's dimension (no model here is Matryoshka)"
    )
    prompt_name: None = Field(None, description=NO_PROMPTS)


class EmbedAllRequest(_Request):
    """``POST /embed_all``: TEI's request for token vectors (no pooling)."""

    inputs: Annotated[Any, WithJsonSchema(TEXTS_SCHEMA)] = Field(
        description="A string or an array of at most MAX_BATCH_SIZE strings; none blank"
    )
    truncate: StrictBool | None = Field(
        None, description="Cut texts over MAX_TEXT_LENGTH instead of 422 (null: false)"
    )
    truncation_direction: Literal["right", "Right"] = Field(
        "right", description="Only right: texts past the token limit are cut at their end"
    )
    prompt_name: None = Field(None, description=NO_PROMPTS)


class TokenizeRequest(_Request):
    """``POST /tokenize``."""

    inputs: Annotated[Any, WithJsonSchema(ANY_TEXTS_SCHEMA)] = Field(
        description="A string or an array of at most MAX_BATCH_SIZE strings"
    )
    add_special_tokens: StrictBool = Field(True, description="Include [CLS], [SEP] and the like")
    prompt_name: None = Field(None, description=NO_PROMPTS)


class DecodeRequest(_Request):
    """``POST /decode``."""

    ids: Annotated[Any, WithJsonSchema(IDS_SCHEMA)] = Field(
        description="Token ids, or an array of at most MAX_BATCH_SIZE arrays of them"
    )
    skip_special_tokens: StrictBool = Field(True, description="Leave out [CLS], [SEP] and the like")


# -- responses --------------------------------------------------------------------------


class TEIEmbedResponse(RootModel[list[list[float]]]):
    """TEI's embed answer: one vector per input, in order (a bare array)."""


class EmbedAllResponse(RootModel[list[list[list[float]]]]):
    """``POST /embed_all``: per input, one vector per token (specials included)."""


class SimpleToken(BaseModel):
    """One token; `start`/`stop` are character offsets (null for a special token)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    text: str = Field(description="The text's own characters, or the special token")
    special: bool
    start: int | None
    stop: int | None


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    """``POST /tokenize``: each input's tokens."""


class DecodeResponse(RootModel[list[str]]):
    """``POST /decode``: each id array as text."""


class EmbeddingModelType(BaseModel):
    """TEI's model type of an embedding model."""

    model_config = ConfigDict(extra="forbid")

    pooling: str = Field(description="mean or cls (unknown for a catalogue model)")


class TEIModelType(BaseModel):
    """TEI's ``model_type``: always an embedding model here."""

    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingModelType


class TEIInfo(BaseModel):
    """``GET /info``: the default model and this server's limits, in TEI's fields."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(description="The default model (first of REQUIRED_MODELS)")
    model_sha: str | None = Field(description="Always null (imported models have no revision)")
    model_dtype: str = Field(description="float32: the ONNX graphs run in float32")
    model_type: TEIModelType
    max_concurrent_requests: int = Field(description="MAX_QUEUE_SIZE: texts queued per model")
    max_input_length: int = Field(description="The model's token limit")
    max_batch_tokens: int = Field(description="BATCH_TOKEN_BUDGET")
    max_batch_requests: int | None = Field(description="BATCH_MAX_TEXTS")
    max_client_batch_size: int = Field(description="MAX_BATCH_SIZE")
    auto_truncate: bool = Field(description="Always true: texts past the token limit are cut")
    tokenization_workers: int = Field(description="THREAD_POOL_WORKERS (shared with inference)")
    version: str = Field(description="embedserve's version")
    sha: str | None = Field(description="Always null")
    docker_label: str | None = Field(description="Always null")
