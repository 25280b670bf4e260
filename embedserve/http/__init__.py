"""The HTTP layer: the app, the APIs' routes and schemas, OpenAPI, metrics; calls the registry."""
