"""The batching engine: batcher, planner, model registry, backends; never Starlette or http/."""
