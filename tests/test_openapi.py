"""`embedserve.http.openapi`: /openapi.json is valid OpenAPI 3.1, documents every route, and its
schemas accept the answers the app really gives (real responses, checked with jsonschema)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import BaseRoute, Mount, Route

from embedserve.errors import EmbedServeError, ImportFailed
from embedserve.http import openapi, schemas
from embedserve.http.route_table import ROUTES, routes
from embedserve.models.store import validate_model_name
from embedserve.settings import Settings
from tests.conftest import Api, Serve

pytestmark = pytest.mark.anyio

API_KEY = "k" * 24
# Error types answered by middleware and handlers rather than by an `EmbedServeError`.
OTHER_ERROR_TYPES = {
    401: ("missing_api_key", "invalid_api_key"),
    404: ("not_found",),
    429: ("rate_limited",),
    500: ("internal_error",),
}


# -- helpers -------------------------------------------------------------------------------
def route_operations(routes: Iterable[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(METHOD, spec path) for every endpoint the routes serve (HEAD comes with GET)."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            methods = route.methods or {"GET"}
            path = openapi.document_path(prefix + route.path)
            found.update((method, path) for method in methods if method != "HEAD")
        elif isinstance(route, Mount) and route.routes:
            found |= route_operations(route.routes, prefix + route.path)
        else:
            raise AssertionError(f"cannot tell what {route!r} serves: give it a Route")
    return found


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


async def get_spec(client: httpx.AsyncClient, **kwargs: Any) -> dict[str, Any]:
    response = await client.get("/openapi.json", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    spec: dict[str, Any] = response.json()
    return spec


def check_documented(
    spec: dict[str, Any], template: str, response: httpx.Response
) -> dict[str, Any]:
    """Fail unless `response`'s status and content type are documented for its operation
    and a JSON body validates against the documented schema; returns the documented answer."""
    method = response.request.method.lower()
    operation = spec["paths"][template][method]
    status = str(response.status_code)
    assert status in operation["responses"], (
        f"{method.upper()} {template} answered {status}, documented: "
        f"{sorted(operation['responses'])}; body {response.text[:300]}"
    )
    documented: dict[str, Any] = operation["responses"][status]
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type in documented["content"], (method, template, status, media_type)
    if media_type == "application/json":
        schema = documented["content"][media_type]["schema"]
        body = response.json()
        error = jsonschema.exceptions.best_match(validator(spec, schema).iter_errors(body))
        assert error is None, (
            f"{method.upper()} {template} {status}: {error.message} at {list(error.absolute_path)}"
        )
    for header, about in documented.get("headers", {}).items():
        assert header in response.headers or not about["required"], f"{header} not sent"
    return documented


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of `schema` whose ``#/components/...`` refs resolve in `spec`."""
    root = {**schema, "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def component(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return validator(spec, {"$ref": f"#/components/schemas/{name}"})


# -- the document ----------------------------------------------------------------------------
async def test_openapi_json_is_valid_openapi_3_1(api: Api) -> None:
    with anyio.fail_after(10):
        spec = await get_spec(api.client)
    validate_openapi(spec)
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] == "embedserve"
    assert {"EmbedResponse", "ErrorResponse", "OpenAIErrorResponse"} <= set(
        spec["components"]["schemas"]
    )


async def test_every_route_is_documented_and_every_documented_route_exists(api: Api) -> None:
    with anyio.fail_after(10):
        spec = await get_spec(api.client)
    served = route_operations(routes())
    documented = spec_operations(spec)
    assert served - documented == set(), "routes the document does not describe"
    assert documented - served == set(), "operations documented without a route"
    assert route_operations(api.app.routes) == served
    # Each route is made from its row of the one table, so none can bypass the document.
    assert all(isinstance(route, openapi.DocumentedRoute) for route in api.app.routes)
    assert openapi.served_operations(api.app.routes) == list(ROUTES)
    expected = {("POST", "/embed/batch"), ("POST", "/v1/embeddings"), ("GET", "/docs")}
    assert expected <= documented


def test_a_route_missing_from_the_table_is_noticed() -> None:
    spec = openapi.build_spec(Settings.build(required_models=[]), ROUTES)
    extra = Route("/brand-new/{thing:path}", lambda request: None, methods=["PUT"])
    assert route_operations([*routes(), extra]) - spec_operations(spec) == {
        ("PUT", "/brand-new/{thing}")
    }


async def test_requests_and_path_parameters_are_described(api: Api) -> None:
    with anyio.fail_after(10):
        spec = await get_spec(api.client)
    embed = spec["paths"]["/embed"]["post"]
    # Exactly one of the two bodies: embedserve's (text) or TEI's (inputs).
    [native, tei] = embed["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert native == {
        "allOf": [{"$ref": "#/components/schemas/EmbedRequest"}],
        "not": {"anyOf": [{"required": ["inputs"]}]},
    }
    assert tei["allOf"] == [{"$ref": "#/components/schemas/TEIEmbedRequest"}]
    assert set(embed["responses"]) >= {"200", "400", "413", "415", "422", "429", "503", "504"}
    assert (
        spec["components"]["schemas"]["BatchEmbedRequest"]["properties"]["texts"]["minItems"] == 1
    )
    for path in ("/models/{model_name}", "/v1/models/{model_name}"):
        [param] = spec["paths"][path]["get"]["parameters"]
        assert param["name"] == "model_name"
        assert param["in"] == "path"
        assert "'/'" in param["description"]
    v1 = spec["paths"]["/v1/embeddings"]["post"]["responses"]
    assert "422" not in v1
    assert v1["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorResponse"
    }
    assert spec["paths"]["/health"]["get"]["responses"]["503"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/HealthResponse"}


def test_each_error_type_is_named_under_its_status() -> None:
    pending: list[type[EmbedServeError]] = [EmbedServeError]
    kinds: dict[int, set[str]] = {s: set(types) for s, types in OTHER_ERROR_TYPES.items()}
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls not in (EmbedServeError, ImportFailed):  # ImportFailed is the CLI's
            kinds.setdefault(cls.status_code, set()).add(cls.error_type)
    for status, types in kinds.items():
        for error_type in types:
            assert re.search(rf"\b{error_type}\b", openapi.ERROR_TEXT[status]), (
                f"{error_type} is not named in ERROR_TEXT[{status}]"
            )


# -- the schemas accept real answers ---------------------------------------------------------
async def test_real_answers_match_the_documented_schemas(serve: Serve) -> None:
    cases: list[tuple[str, str, str, dict[str, Any]]] = [
        ("POST", "/embed", "/embed", {"json": {"text": "hello world"}}),
        ("POST", "/embed", "/embed", {"json": {"text": "x" * 40, "truncate": True}}),
        ("POST", "/embed/batch", "/embed/batch", {"json": {"texts": ["a", "b c", "a"]}}),
        ("GET", "/health", "/health", {}),
        ("GET", "/ready", "/ready", {}),
        ("GET", "/metrics", "/metrics", {}),
        ("GET", "/metrics?format=prometheus", "/metrics", {}),
        ("GET", "/metrics", "/metrics", {"headers": {"accept": "text/plain"}}),
        ("GET", "/metrics?format=xml", "/metrics", {}),
        ("GET", "/models", "/models", {}),
        ("GET", "/models/fake/a", "/models/{model_name}", {}),
        ("GET", "/models/fake/b", "/models/{model_name}", {}),
        ("GET", "/models/fake%2Fa", "/models/{model_name}", {}),
        ("POST", "/v1/embeddings", "/v1/embeddings", {"json": {"model": "fake/a", "input": "a"}}),
        (
            "POST",
            "/v1/embeddings",
            "/v1/embeddings",
            {"json": {"model": "fake/a", "input": ["a", "b"], "encoding_format": "base64"}},
        ),
        ("GET", "/v1/models", "/v1/models", {}),
        ("GET", "/v1/models/fake/a", "/v1/models/{model_name}", {}),
        ("GET", "/openapi.json", "/openapi.json", {}),
        ("GET", "/docs", "/docs", {}),
        ("GET", "/docs/static/init.js", "/docs/static/{name}", {}),
        ("GET", "/docs/static/swagger-ui.css", "/docs/static/{name}", {}),
        ("GET", "/docs/static/favicon-32x32.png", "/docs/static/{name}", {}),
        # errors, in both shapes
        ("POST", "/embed", "/embed", {"content": b"{bad", "headers": {"content-type": "a/json"}}),
        ("POST", "/embed", "/embed", {"content": b"{bad"}),
        ("POST", "/embed/batch", "/embed/batch", {"json": {"texts": []}}),
        ("POST", "/embed", "/embed", {"json": {"text": "hi", "model_name": "nope/x"}}),
        ("POST", "/embed", "/embed", {"json": {"text": "hi", "model_name": "fake/c"}}),
        ("POST", "/embed", "/embed", {"json": {"text": "hi", "model_name": "../etc"}}),
        ("POST", "/embed", "/embed", {"json": {"text": "y" * 4096}}),
        ("GET", "/models/nope/x", "/models/{model_name}", {}),
        ("POST", "/v1/embeddings", "/v1/embeddings", {"json": {"input": "a"}}),
        ("POST", "/v1/embeddings", "/v1/embeddings", {"json": {"model": "x/y", "input": "a"}}),
        ("GET", "/v1/models/nope/x", "/v1/models/{model_name}", {}),
        ("GET", "/docs/static/nope.js", "/docs/static/{name}", {}),
    ]
    seen: set[int] = set()
    with anyio.fail_after(20):
        async with serve(
            max_text_chars=16, max_request_bytes=2048, allowed_models=["fake/a", "fake/b"]
        ) as api:
            spec = await get_spec(api.client)
            for method, url, template, kwargs in cases:
                response = await api.client.request(method, url, **kwargs)
                check_documented(spec, template, response)
                seen.add(response.status_code)
            api.registry.begin_shutdown()
            for url in ("/health", "/ready"):
                check_documented(spec, url, await api.client.get(url))
            draining = await api.client.post("/embed", json={"text": "late"})
            assert check_documented(spec, "/embed", draining)["headers"]["Retry-After"]
            seen.add(draining.status_code)
    assert seen >= {200, 400, 403, 404, 413, 415, 422, 503}


async def test_rate_limits_and_api_keys_are_documented_where_they_apply(serve: Serve) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with anyio.fail_after(10):
        async with serve(
            api_keys=[API_KEY], enable_rate_limit=True, rate_limit_per_minute=2
        ) as api:
            spec = await get_spec(api.client, headers=headers)
            refused = await api.client.get("/models")
            for _ in range(3):
                limited = await api.client.post("/embed", json={"text": "hi"}, headers=headers)
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/models"]["get"]["security"] == [{"apiKey": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "401" in spec["paths"]["/docs"]["get"]["responses"]
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]
    assert "429" not in spec["paths"]["/health"]["get"]["responses"]
    assert refused.status_code == 401
    check_documented(spec, "/models", refused)
    assert limited.status_code == 429
    assert limited.json()["error_type"] == "rate_limited"
    check_documented(spec, "/embed", limited)


async def test_without_keys_or_rate_limit_neither_401_nor_429_is_promised(api: Api) -> None:
    with anyio.fail_after(10):
        spec = await get_spec(api.client)
    assert "securitySchemes" not in spec["components"]
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())
    assert "401" not in spec["paths"]["/models"]["get"]["responses"]
    assert "429" not in spec["paths"]["/models"]["get"]["responses"]


async def test_the_schemas_refuse_wrong_bodies(api: Api) -> None:
    with anyio.fail_after(10):
        spec = await get_spec(api.client)
        embedded = (await api.client.post("/embed", json={"text": "hi"})).json()
    openai_error = {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    with pytest.raises(jsonschema.ValidationError):
        component(spec, "ErrorResponse").validate(openai_error)
    with pytest.raises(jsonschema.ValidationError):
        component(spec, "OpenAIErrorResponse").validate({"error": "m", "error_type": "t"})
    component(spec, "EmbedResponse").validate(embedded)
    for broken in (
        {k: v for k, v in embedded.items() if k != "embedding"},
        {**embedded, "embedding": ["a"]},
        {**embedded, "surprise": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            component(spec, "EmbedResponse").validate(broken)


# -- the rules enforced after parsing, as the document states them ----------------------------
def _store_accepts(name: str) -> bool:
    try:
        validate_model_name(name)
    except EmbedServeError:
        return False
    return True


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(
    name=st.one_of(
        st.from_regex(schemas.MODEL_NAME_PATTERN, fullmatch=True),
        st.text(alphabet="aZ9./_-%\\\n \x00", max_size=12),
        st.text(max_size=16),
    )
)
def test_the_model_name_pattern_is_what_the_store_accepts(name: str) -> None:
    # fullmatch: a JSON Schema pattern's '$' is the end of the text, not before a last '\n'.
    documented = re.fullmatch(schemas.MODEL_NAME_PATTERN, name) is not None
    documented = documented and len(name) <= schemas.MODEL_NAME_SCHEMA["maxLength"]
    assert documented == _store_accepts(name), repr(name)


def test_the_text_pattern_is_what_check_texts_accepts() -> None:
    pattern = re.compile(schemas.TEXT_SCHEMA["pattern"])
    for code in range(0x10000):
        text = chr(code)
        try:
            schemas.check_texts([text], max_length=8, truncate=False, field="text")
            accepted = True
        except EmbedServeError:
            accepted = False
        assert (pattern.search(text) is not None) == accepted, hex(code)


def test_only_json_schema_keywords_reach_the_document() -> None:
    # pydantic writes a constraint it cannot translate under its own name ("ge": 1), which
    # every JSON Schema reader ignores: the document would promise less than is enforced.
    spec = openapi.build_spec(Settings.build(), ROUTES)
    pydantic_only = {"ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of"}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "type" in node or "anyOf" in node:
                assert not pydantic_only & set(node), (where, node)
            for key, value in node.items():
                if key != "properties":
                    walk(value, f"{where}/{key}")
                else:
                    for name, prop in value.items():
                        walk(prop, f"{where}/properties/{name}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{where}/{index}")

    walk(spec["components"]["schemas"], "#/components/schemas")


# -- caching -----------------------------------------------------------------------------------
async def test_the_document_is_built_once_per_app(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Settings] = []
    real = openapi.build_spec

    def counting(settings: Settings, *args: Any, **kwargs: Any) -> dict[str, Any]:
        built.append(settings)
        return real(settings, *args, **kwargs)

    monkeypatch.setattr(openapi, "build_spec", counting)
    with anyio.fail_after(10):
        async with serve(max_batch_size=3) as small:
            first = await small.client.get("/openapi.json")
            second = await small.client.get("/openapi.json")
        async with serve(max_batch_size=7) as other:
            third = await other.client.get("/openapi.json")
    assert len(built) == 2
    assert first.content == second.content
    assert "at most 3 texts" in first.json()["info"]["description"]
    assert "at most 7 texts" in third.json()["info"]["description"]
