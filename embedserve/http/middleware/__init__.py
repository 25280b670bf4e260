"""ASGI middleware: access log, API keys, rate limits, body limits, request ids, client address."""
