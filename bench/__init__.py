"""embedserve's benchmark harness: ``make bench`` measures, then writes docs/BENCHMARKS.md.

Modules: `run` (configuration and the order of measurements), `facts` (machine and corpora),
`schedules` and `inprocess` (the in-process ceiling of both backends), `server` (the real
server under load, started by `devkit.launcher` and driven by `devkit.loadclient`), then the
pure output side: `stats`, `figures`, `targets`, `tables`, `report` and `plot`. Not a test
suite: it reports figures and asserts nothing about speed.
"""
