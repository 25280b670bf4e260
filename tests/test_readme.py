"""README.md and docs/*.md stay true: every setting and route documented, every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

from embedserve.http.route_table import routes
from embedserve.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOCS = "\n".join(page.read_text() for page in PAGES)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = "```"


def prose(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(FENCE):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (`## Foo: `bar`` -> `foo-bar`; repeats -1, -2)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(text):
        if not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        repeats = seen.get(slug, 0)
        seen[slug] = repeats + 1
        found.add(slug if repeats == 0 else f"{slug}-{repeats}")
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall("\n".join(prose(page.read_text()))):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(target)
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    return broken


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    env_name = alias.choices[-1]
    assert f"| `{env_name}` |" in DOCS


def test_every_route_is_documented() -> None:
    for route in routes():
        path = getattr(route, "path", "").replace("{model_name:path}", "{model_name}")
        assert f"`{path}`" in DOCS or f" {path}`" in DOCS, path


def test_every_route_has_a_curl_example() -> None:
    curl_lines = [line for line in DOCS.splitlines() if "curl " in line]
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


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Behind a proxy: `TRUSTED_PROXIES`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Twice\n\n## Twice\n\n"
        "[ok](other.md#behind-a-proxy-trusted_proxies) [ok](#twice-1) [ok](https://x.org/y)\n"
        "[across\nlines](other.md#other) [across\nlines](other.md#others)\n"
        "[no file](missing.md) [no anchor](other.md#nowhere) [no anchor](#twice-2)\n"
        "```sh\n# Not a heading [in code](missing-too.md)\n```\n"
    )
    assert broken_links(page) == ["other.md#others", "missing.md", "other.md#nowhere", "#twice-2"]


def test_readme_is_short_and_indexes_every_docs_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in text, page.name


def package_map() -> set[str]:
    """The module paths README's package map names (its indented tree of folders and files)."""
    text = README.read_text()
    tree = text[text.index("```text\nembedserve/\n") :].split("\n```\n", 1)[0].splitlines()[1:]
    named, folders = set(), ["embedserve/"]
    for line in tree:
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        else:
            named.add("".join(folders) + name)
    return named


def test_package_map_names_every_module_and_nothing_else() -> None:
    modules = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "embedserve").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert package_map() == modules
