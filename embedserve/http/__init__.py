"""The HTTP layer: the Starlette app, the three APIs' routes and schemas, OpenAPI, metrics."""
