"""Runnable examples built on embedserve's HTTP API (not part of the installed package)."""
