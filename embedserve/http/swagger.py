"""``GET /docs``: Swagger UI over ``/openapi.json``, every asset served by embedserve itself.

The assets are the dist files of Swagger UI shipped by the PyPI package
``swagger-ui-bundle-v2`` (Apache-2.0), served from its installed directory under
``/docs/static/``; only the files the page uses are served. No CDN is referenced, so the
page works offline, and its Content-Security-Policy lets the browser load nothing from
anywhere else.
"""

from __future__ import annotations

import html
from pathlib import Path

import swagger_ui_bundle
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from embedserve.http.responses import error_response

SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
INIT_JS = "init.js"
# Name under /docs/static/ -> media type. Swagger UI's own files come from SWAGGER_UI_DIR.
ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    INIT_JS: "text/javascript; charset=utf-8",
}
ASSET_NAMES = tuple(ASSETS)
CACHE_CONTROL = "public, max-age=3600"

# Swagger UI sets inline styles, hence 'unsafe-inline' for styles only; scripts are files.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

# No inline script (the CSP forbids it): the spec's URL reaches it as a data attribute.
# validatorUrl null: Swagger UI would otherwise send the spec to an online validator.
_INIT = b"""\
window.ui = SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.specUrl,
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
"""

_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>embedserve API</title>
<link rel="stylesheet" href="{static}/swagger-ui.css">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png">
</head>
<body>
<noscript>This page needs JavaScript; the API is described in
<a href="{spec}">{spec}</a>.</noscript>
<div id="swagger-ui" data-spec-url="{spec}"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script src="{static}/{init}"></script>
</body>
</html>
"""


async def docs_page(request: Request) -> Response:
    """``GET /docs``: the Swagger UI page (assets and spec by absolute local paths)."""
    root = html.escape(request.scope.get("root_path", "").rstrip("/"), quote=True)
    page = _PAGE.format(static=f"{root}/docs/static", spec=f"{root}/openapi.json", init=INIT_JS)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP})


async def docs_asset(request: Request) -> Response:
    """``GET /docs/static/{name}``: one of `ASSETS`; 404 for any other name."""
    name = request.path_params["name"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return error_response(404, f"no documentation asset {name!r}", "not_found")
    headers = {"Cache-Control": CACHE_CONTROL}
    if name == INIT_JS:
        return Response(_INIT, media_type=media_type, headers=headers)
    return FileResponse(SWAGGER_UI_DIR / name, media_type=media_type, headers=headers)
