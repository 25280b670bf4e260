"""ASGI middleware: API keys, rate limits, body limits, request ids, client addresses."""
