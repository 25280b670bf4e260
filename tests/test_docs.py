"""`embedserve.http.swagger`: /docs is Swagger UI with every asset served locally (no CDN)."""

from __future__ import annotations

from html.parser import HTMLParser

import anyio
import httpx
import pytest

from embedserve.http.swagger import ASSET_NAMES
from tests.conftest import Api

pytestmark = pytest.mark.anyio

URL_ATTRIBUTES = {"src", "href", "data-spec-url", "action", "srcset"}


class Links(HTMLParser):
    """Every URL-valued attribute of a page, as (tag, attribute, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [(tag, k, v) for k, v in attrs if k in URL_ATTRIBUTES and v is not None]


def links_of(page: str) -> list[tuple[str, str, str]]:
    parser = Links()
    parser.feed(page)
    return parser.links


async def test_docs_page_uses_only_local_assets_and_all_are_served(api: Api) -> None:
    with anyio.fail_after(10):
        page = await api.client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        links = links_of(page.text)
        assert links, page.text
        for tag, attribute, url in links:
            assert url.startswith("/") and not url.startswith("//"), (tag, attribute, url)
        urls = {url for _, _, url in links}
        assert "/openapi.json" in urls
        assert {f"/docs/static/{name}" for name in ASSET_NAMES} <= urls
        assert "http" not in page.text.lower().replace('lang="en"', "")
        for url in sorted(urls):
            asset = await api.client.get(url)
            assert asset.status_code == 200, url
            assert asset.content, url
            if url.endswith(".js"):
                assert asset.headers["content-type"].startswith("text/javascript"), url
            if url.endswith(".css"):
                assert asset.headers["content-type"].startswith("text/css"), url
    bundle = (await api.client.get("/docs/static/swagger-ui-bundle.js")).text
    assert "SwaggerUIBundle" in bundle
    init = (await api.client.get("/docs/static/init.js")).text
    assert "specUrl" in init
    assert "validatorUrl: null" in init


async def test_docs_page_forbids_loading_anything_from_elsewhere(api: Api) -> None:
    with anyio.fail_after(10):
        page = await api.client.get("/docs")
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "img-src", "connect-src"):
        sources = policy[directive].split()
        assert "'self'" in sources
        assert all(s in ("'self'", "'unsafe-inline'", "data:") for s in sources), policy
    assert "'unsafe-inline'" not in policy["script-src"]
    assert "<script>" not in page.text  # every script is a file: the policy allows no other


@pytest.mark.parametrize("name", ["nope.js", "index.html", "swagger-ui.js.map", "..%2fdocs.py"])
async def test_only_the_listed_assets_are_served(api: Api, name: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.get(f"/docs/static/{name}")
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


async def test_docs_page_follows_the_root_path(api: Api) -> None:
    transport = httpx.ASGITransport(app=api.app, root_path="/embedserve")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with anyio.fail_after(10):
            page = await client.get("/docs")
    urls = {url for _, _, url in links_of(page.text)}
    assert "/embedserve/openapi.json" in urls
    assert all(url.startswith("/embedserve/") for url in urls), urls
