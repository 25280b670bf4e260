"""/docs in a real browser: headless Chromium renders every endpoint of the real server's
/openapi.json, with nothing but loopback reachable (so no asset can come from a CDN)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from devkit.launcher import DEFAULT_MODEL, ServerProcess, running_server
from tests.support import require_exported_model

pytestmark = pytest.mark.integration

BROWSER_TIMEOUT_S = 120
# Every host name but the loopback address fails to resolve: a page that needed the network
# (a CDN, an online validator) would not render.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=10000",
    "--enable-logging=stderr",
    "--v=0",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    """Debian's chromium (``make test`` installs it when apt is available); skip without it."""
    path = shutil.which(os.environ.get("CHROMIUM") or "chromium")
    if not path:
        pytest.skip(
            "chromium is not installed and could not be installed here: 'apt-get install "
            "chromium' (make test does it when apt-get is available and it runs as root)"
        )
    return path


def run_chromium(
    tmp_path: Path, url: str, *args: str, window: str = "1280,1800"
) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on `url` with its own profile; fails past the time bound."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={window}",
        *args,
        url,
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """The real server with the exported model; skip without it (fail if it is required)."""
    require_exported_model()
    with running_server() as proc:
        yield proc


def test_docs_render_every_endpoint_offline(server: ServerProcess, tmp_path: Path) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    done = run_chromium(tmp_path, f"{server.base_url}/docs", "--dump-dom")
    rendered = set(re.findall(r'data-path="([^"]+)"', done.stdout))
    assert rendered == set(spec["paths"]), f"DOM: {done.stdout[:2000]}"
    assert {"/embed/batch", "/v1/embeddings", "/models/{model_name}"} <= rendered
    assert "OAS 3.1" in done.stdout
    # Chromium logs the page's console here: policy violations and uncaught script errors.
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Content Security Policy" in line], console
    assert not [line for line in console if "Uncaught" in line], console


def test_docs_screenshot_shows_a_rendered_page(server: ServerProcess, tmp_path: Path) -> None:
    shot = tmp_path / "docs.png"
    run_chromium(tmp_path, f"{server.base_url}/docs", f"--screenshot={shot}")
    image = shot.read_bytes()
    assert image.startswith(PNG_MAGIC)
    # A blank 1280x1800 page compresses to a few KB; the rendered list of endpoints does not.
    assert len(image) > 50_000, f"{len(image)} bytes: the page looks empty ({shot})"


def test_a_slash_sent_as_percent_2f_reaches_the_model(server: ServerProcess) -> None:
    # Swagger UI's "Try it out" encodes the '/' inside {model_name} this way.
    response = httpx.get(f"{server.base_url}/models/{quote(DEFAULT_MODEL, safe='')}", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == DEFAULT_MODEL
