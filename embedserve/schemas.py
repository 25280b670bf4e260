"""Request bodies of the HTTP API and the checks that depend on settings (length, count)."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from embedserve.errors import BadRequest, ValidationFailed

M = TypeVar("M", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model_name: StrictStr | None = Field(None, description="Model to use; default: first required")
    truncate: StrictBool = Field(False, description="Cut texts over MAX_TEXT_LENGTH instead of 422")


class EmbedRequest(_Request):
    """``POST /embed``: one text."""

    text: StrictStr


class BatchEmbedRequest(_Request):
    """``POST /embed/batch``: several texts, answered in the same order."""

    texts: list[StrictStr] = Field(min_length=1)


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; raises BadRequest (400) on malformed JSON."""
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.msg} at position {exc.pos}") from None


def validate(model: type[M], data: Any) -> M:
    """Validate parsed JSON against `model`; raises ValidationFailed (422) with field details."""
    if not isinstance(data, dict):
        raise ValidationFailed("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details: list[dict[str, object]] = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        first = details[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"  # type: ignore[attr-defined]
        raise ValidationFailed(
            f"invalid field '{where}': {first['msg']}", details=details
        ) from None


def check_texts(texts: list[str], *, max_length: int, truncate: bool, field: str) -> list[str]:
    """Refuse blank texts; cut or refuse texts longer than `max_length` characters."""
    checked: list[str] = []
    for index, text in enumerate(texts):
        where = field if len(texts) == 1 and field == "text" else f"{field}[{index}]"
        if len(text) > max_length:
            if not truncate:
                raise ValidationFailed(
                    f"invalid field '{where}': text is {len(text)} characters, over the limit of "
                    f'{max_length} (MAX_TEXT_LENGTH); send "truncate": true to cut it'
                )
            text = text[:max_length]
        if not text.strip():
            raise ValidationFailed(f"invalid field '{where}': text must not be empty or blank")
        checked.append(text)
    return checked
