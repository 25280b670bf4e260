"""README.md stays true: every setting and every route is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import AliasChoices

from embedserve.http.routes import routes
from embedserve.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    env_name = alias.choices[-1]
    assert f"| `{env_name}` |" in README


def test_every_route_is_documented() -> None:
    for route in routes():
        path = getattr(route, "path", "").replace("{model_name:path}", "{model_name}")
        assert f"`{path}`" in README or f" {path}`" in README, path


def test_every_route_has_a_curl_example() -> None:
    curl_lines = [line for line in README.splitlines() if "curl " in line]
    for route in routes():
        path = getattr(route, "path", "")
        concrete = (
            path.replace("{model_name:path}", "sentence-transformers/all-MiniLM-L6-v2")
            .replace("{model_name}", "sentence-transformers/all-MiniLM-L6-v2")
            .replace("{name}", "")
        )
        if concrete.startswith("/docs/static/"):
            continue  # assets of /docs, fetched by the page itself
        assert any(f"localhost:8000{concrete}" in line for line in curl_lines), path
