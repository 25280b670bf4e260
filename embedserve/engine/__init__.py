"""The batching engine: batcher, planner, model registry, backends. Never imports Starlette."""
