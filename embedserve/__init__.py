"""embedserve: a dynamic micro-batching embedding server."""

__version__ = "0.1.0"
