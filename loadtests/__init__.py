"""Load tests for embedserve: a committed text corpus, a Locust file and a runner."""
