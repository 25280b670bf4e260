"""The package layout (issue 13): which layer may import which, module sizes, subpackages.

Imports are read from the source with `ast`, so every import counts: at module level, inside
functions (lazy imports), under ``if TYPE_CHECKING:``, and ``importlib.import_module("...")``
with a literal name. The rules, by the importing module:

- ``embedserve/engine/`` (batcher, planner, registry, backends): nothing from Starlette, uvicorn
  or ``embedserve.http``. The engine runs without a web framework.
- ``embedserve/http/`` (app, routes, schemas, middleware): never the backend modules
  ``embedserve.engine.backend`` or ``embedserve.engine.packed``; it talks to the registry.
- ``embedserve/models/`` (model files): nothing from ``embedserve.http``, ``embedserve.engine``,
  Starlette or uvicorn.
- the top level: only the wiring modules (`WIRING`: cli.py, server.py, __main__.py) import the
  layers; the others (settings, errors, logs, ...) are what every layer uses and import none of
  them, nor Starlette or uvicorn.

An exception is a row of `ALLOWED` with its reason; a row no longer needed fails too, so the
table only ever shrinks to what is true.

Module size: a module over `MAX_LINES` lines says why it stays one module in its docstring, on
a line (best, a paragraph) that begins "One module because" (see `SIZE_REASON`).
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "embedserve"

# Top-level modules that build the layers into a program and so may import all of them.
WIRING = frozenset({"embedserve.cli", "embedserve.server", "embedserve.__main__"})
LAYERS = ("embedserve.engine", "embedserve.http", "embedserve.models")
WEB = ("starlette", "uvicorn")


@dataclass(frozen=True)
class Rule:
    """Modules under `scope` (a package, or a module) import nothing under `forbidden`."""

    scope: str
    forbidden: tuple[str, ...]
    why: str


RULES = (
    Rule(
        "embedserve.engine",
        (*WEB, "embedserve.http"),
        "the engine runs without a web framework",
    ),
    Rule(
        "embedserve.http",
        ("embedserve.engine.backend", "embedserve.engine.packed"),
        "the HTTP layer talks to the registry, never to a backend",
    ),
    Rule(
        "embedserve.models",
        (*WEB, "embedserve.http", "embedserve.engine"),
        "model storage is below the engine and knows nothing of HTTP",
    ),
)


@dataclass(frozen=True)
class Import:
    """One name `module` imports: `target` is absolute and dotted (``pkg.mod.Name`` for
    ``from pkg.mod import Name``), `lazy` when the import runs inside a function."""

    module: str
    target: str
    line: int
    lazy: bool


# (importing module, forbidden module it imports) -> why it is allowed. A row that no import
# needs any more fails `test_every_allowance_is_still_needed`: delete it then.
ALLOWED: dict[tuple[str, str], str] = {
    # The importer's parity checks load the exported model through the serving loaders, so
    # that the check proves the model as served (see importer.py's docstring). Lazy only.
    ("embedserve.models.importer", "embedserve.engine.backend"): "parity as served (lazy)",
    ("embedserve.models.importer", "embedserve.engine.packed"): "parity as served (lazy)",
}
# Allowed imports that must stay inside functions (importing the module loads no engine code).
LAZY_ONLY = frozenset({"embedserve.models.importer"})

MAX_LINES = 350
# The stated reason for a long module: a docstring line beginning with these words.
SIZE_REASON = re.compile(r"^One module because\b", re.MULTILINE)


# -- the checker ------------------------------------------------------------------------
def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under `root` (the folder holding ``embedserve/``)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import in `path` (module `module`), wherever it is in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, lazy))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.append(Import(module, f"{base}.{alias.name}", node.lineno, lazy))
        elif isinstance(node, ast.Call) and (named := _import_call_target(node)) is not None:
            found.append(Import(module, named, node.lineno, lazy))
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _import_call_target(node: ast.Call) -> str | None:
    """The module ``importlib.import_module("x")`` or ``__import__("x")`` names, if literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rules_for(module: str) -> list[Rule]:
    """The rules `module` obeys: its layer's, or the top level's shared-module rule."""
    rules = [rule for rule in RULES if _under(module, rule.scope)]
    top_level = module.count(".") <= 1 and not any(_under(module, layer) for layer in LAYERS)
    if top_level and module not in WIRING:
        rules.append(Rule(module, (*WEB, *LAYERS), "shared top-level modules wire nothing"))
    return rules


@dataclass(frozen=True)
class Violation:
    imported: Import
    forbidden: str
    why: str

    def __str__(self) -> str:
        i = self.imported
        return f"{i.module}:{i.line} imports {i.target} ({self.forbidden}: {self.why})"


def violations(root: Path) -> list[Violation]:
    """Every import under `root` that breaks a rule (allowances not applied)."""
    found = []
    for module, path in modules(root).items():
        for imported in imports_of(module, path):
            for rule in rules_for(module):
                for forbidden in rule.forbidden:
                    if _under(imported.target, forbidden):
                        found.append(Violation(imported, forbidden, rule.why))
    return found


def allowance(violation: Violation) -> tuple[str, str] | None:
    """The `ALLOWED` row that covers `violation`, if any."""
    i = violation.imported
    for module, target in ALLOWED:
        if i.module == module and _under(i.target, target):
            if module in LAZY_ONLY and not i.lazy:
                return None
            return module, target
    return None


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def unexplained_long_modules(root: Path) -> list[str]:
    """Modules over `MAX_LINES` lines whose docstring gives no reason to stay one module."""
    found = []
    for module, path in modules(root).items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines <= MAX_LINES:
            continue
        text = docstring(path)
        if not SIZE_REASON.search(text):
            found.append(f"{module} ({lines} lines)")
    return found


# -- the package as it is ---------------------------------------------------------------
def test_the_checker_reads_the_real_package() -> None:
    found = {
        (i.module, i.target, i.lazy) for m, p in modules(ROOT).items() for i in imports_of(m, p)
    }
    # One import of each kind the rules depend on, so that a parsing slip cannot pass quietly.
    assert ("embedserve.server", "embedserve.http.app.create_app", False) in found
    assert ("embedserve.http.app", "starlette.applications.Starlette", False) in found
    assert ("embedserve.cli", "embedserve.models.importer.import_model", True) in found
    assert {"embedserve.engine", "embedserve.http", "embedserve.models"} <= set(modules(ROOT))


def test_layers_import_only_what_the_rules_allow() -> None:
    broken = [str(v) for v in violations(ROOT) if allowance(v) is None]
    assert not broken, "layer rule broken (see this file's docstring):\n" + "\n".join(broken)


def test_every_allowance_is_still_needed() -> None:
    used = {allowance(v) for v in violations(ROOT)}
    stale = [f"{module} -> {target}" for module, target in ALLOWED if (module, target) not in used]
    assert not stale, f"delete these rows from ALLOWED, nothing needs them now: {stale}"


def test_long_modules_say_why_they_stay_one_module() -> None:
    unexplained = unexplained_long_modules(ROOT)
    assert not unexplained, (
        f"over {MAX_LINES} lines with no docstring paragraph beginning 'One module because' "
        f"(split the module or state the reason): {unexplained}"
    )


def test_every_subpackage_has_an_init_with_a_one_line_docstring() -> None:
    folders = {path.parent for path in (ROOT / PACKAGE).rglob("*.py")}
    for folder in sorted(folders):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder.relative_to(ROOT)} has no __init__.py"
        text = docstring(init)
        assert text and "\n" not in text, f"{init.relative_to(ROOT)}: one line saying what it owns"


def test_setuptools_finds_every_subpackage() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = set(find_packages(str(ROOT), include=include))
    expected = {m for m, p in modules(ROOT).items() if p.name == "__init__.py"}
    assert packages == expected


# -- the checker on a made-up package, so that it can fail ---------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


CLEAN = {
    "__init__.py": '"""Fake."""\n',
    "cli.py": "from embedserve.http.app import create_app\nfrom embedserve.engine import backend\n",
    "settings.py": "import os\nfrom embedserve.errors import EmbedServeError\n",
    "engine/__init__.py": '"""Engine."""\n',
    "engine/backend.py": "import numpy\nfrom embedserve.models.store import ModelSpec\n",
    "engine/registry.py": "from embedserve.engine.backend import Backend\n",
    "http/__init__.py": '"""HTTP."""\n',
    "http/app.py": "from starlette.applications import Starlette\n"
    "from embedserve.engine.registry import ModelRegistry\n",
    "models/__init__.py": '"""Models."""\n',
    "models/store.py": "import json\n",
}


def test_a_package_that_keeps_the_rules_has_no_violations(tmp_path: Path) -> None:
    assert violations(write_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("name", "text", "forbidden"),
    [
        ("engine/batcher.py", "from starlette.requests import Request\n", "starlette"),
        ("engine/batcher.py", "def f():\n    import uvicorn\n", "uvicorn"),
        (
            "engine/batcher.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from embedserve.http.app import create_app\n",
            "embedserve.http",
        ),
        ("engine/batcher.py", "from ..http import routes\n", "embedserve.http"),
        ("http/routes.py", "from embedserve.engine import backend\n", "embedserve.engine.backend"),
        ("http/routes.py", "from ..engine.packed import load_packed\n", "embedserve.engine.packed"),
        (
            "http/middleware/auth.py",
            "import importlib\nm = importlib.import_module('embedserve.engine.backend')\n",
            "embedserve.engine.backend",
        ),
        (
            "models/store.py",
            "class A:\n    def f(self):\n        from embedserve.http import app\n",
            "embedserve.http",
        ),
        ("settings.py", "from embedserve.http.middleware.auth import x\n", "embedserve.http"),
        ("logs.py", "from starlette.types import Scope\n", "starlette"),
        ("errors.py", "import embedserve.engine.registry\n", "embedserve.engine"),
    ],
)
def test_each_rule_catches_a_violation(
    tmp_path: Path, name: str, text: str, forbidden: str
) -> None:
    [violation] = violations(write_tree(tmp_path, {**CLEAN, name: text}))
    assert violation.forbidden == forbidden
    assert violation.imported.module == f"{PACKAGE}.{name[:-3].replace('/', '.')}"


def test_an_allowance_for_a_lazy_import_does_not_cover_a_module_level_one(tmp_path: Path) -> None:
    lazy = "def parity():\n    from embedserve.engine.backend import load_local\n"
    eager = "from embedserve.engine.backend import load_local\n"
    for text, allowed in ((lazy, True), (eager, False)):
        [violation] = violations(write_tree(tmp_path, {**CLEAN, "models/importer.py": text}))
        assert (allowance(violation) is not None) is allowed


def test_a_long_module_needs_its_reason(tmp_path: Path) -> None:
    body = "x = 1\n" * MAX_LINES
    files = {
        "engine/short.py": '"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1),  # exactly MAX_LINES
        "engine/silent.py": '"""Long, no reason."""\n' + body,
        "engine/mid_line.py": '"""Long. Not: One module because it says so mid-line."""\n' + body,
        "engine/explained.py": '"""Long.\n\nOne module because one owner.\n"""\n' + body,
    }
    found = unexplained_long_modules(write_tree(tmp_path, {**CLEAN, **files}))
    assert [entry.split(" ")[0] for entry in found] == [
        "embedserve.engine.mid_line",
        "embedserve.engine.silent",
    ]
