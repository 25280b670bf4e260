"""The exception tree: every error a client can see, with its HTTP status and error type.

Handlers are looked up along the class hierarchy, so one handler for `EmbedServeError`
renders every subclass as ``{"error": message, "error_type": type}``. Library errors are
wrapped with ``raise ... from exc`` at the boundary that imports the library.
"""

from __future__ import annotations


class EmbedServeError(Exception):
    """Base class. `status_code` and `error_type` decide how the client sees it.

    `param` names the request field at fault; only OpenAI's error shape (``/v1``) shows it.
    """

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param


class BadRequest(EmbedServeError):
    """Malformed request body (for example invalid JSON)."""

    status_code = 400
    error_type = "bad_request"


class InvalidModelName(BadRequest):
    """A model name that could reach outside the models directory, or is not a name at all."""

    error_type = "invalid_model_name"


class UnsupportedMediaType(EmbedServeError):
    """The request body is not JSON."""

    status_code = 415
    error_type = "unsupported_media_type"


class ValidationFailed(EmbedServeError):
    """The body parsed but its fields are missing, mistyped or out of range."""

    status_code = 422
    error_type = "validation_error"

    def __init__(self, message: str, *, details: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class BodyTooLarge(EmbedServeError):
    """The request body exceeds the configured limit; raised while the body streams in."""

    status_code = 413
    error_type = "request_too_large"


class TooManyInputs(EmbedServeError):
    """More inputs than MAX_BATCH_SIZE on a TEI route: 413, the status TEI answers for a
    batch over its client batch size (the native API answers 422, the OpenAI one 400)."""

    status_code = 413
    error_type = "validation_error"


class BodyTimeout(EmbedServeError):
    """The request body did not arrive within BODY_TIMEOUT_S (a slow or stalled client)."""

    status_code = 408
    error_type = "body_timeout"


class ModelNotAllowed(EmbedServeError):
    """The model is outside the ALLOWED_MODELS allow-list; nothing was loaded."""

    status_code = 403
    error_type = "model_not_allowed"


class ModelNotFound(EmbedServeError):
    """No local model directory and no catalogue entry has this name."""

    status_code = 404
    error_type = "model_not_found"


class ModelUnavailable(EmbedServeError):
    """The model is known but could not be loaded (missing files, failed download, corrupt)."""

    status_code = 503
    error_type = "model_unavailable"


class Overloaded(EmbedServeError):
    """The model's queue is full, or its queued work would outlast the request's timeout:
    refused at once, retry later."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class RequestTimeout(EmbedServeError):
    """The request was not answered within REQUEST_TIMEOUT; its queued work was dropped."""

    status_code = 504
    error_type = "timeout"


class ShuttingDown(EmbedServeError):
    """The server is draining and admits no new work."""

    status_code = 503
    error_type = "shutting_down"

    def __init__(self, message: str = "server is shutting down") -> None:
        super().__init__(message, headers={"Retry-After": "1", "Connection": "close"})


class InferenceFailed(EmbedServeError):
    """The model failed on this request's texts. A failed batch is retried in parts (the
    batcher's `_isolate`), so only the requests holding the texts to blame get this, or
    every request of the batch when the backend fails on any input; also a failed
    tokenisation, or a failure of work outside a batch (TEI's token-level routes)."""

    status_code = 500
    error_type = "inference_error"


class ModelFailed(InferenceFailed):
    """`InferenceFailed` on a TEI route: 424 (Failed Dependency), TEI's status for an error
    of the model."""

    status_code = 424


class NotSupported(EmbedServeError):
    """The model cannot do what was asked (token vectors from a model without a packed
    graph): 424, as TEI answers a route its model does not support."""

    status_code = 424
    error_type = "not_supported"


class ImportFailed(EmbedServeError):
    """`embedserve models import` could not produce a model that passes parity."""

    status_code = 500
    error_type = "import_failed"
