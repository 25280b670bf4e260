"""embedserve's benchmark harness: ``make bench`` measures, then writes docs/BENCHMARKS.md.

Modules: `run` (configuration and the order of measurements), `facts` (machine and corpora),
`inprocess` (the in-process ceiling), `loadgen` (the load generator process), `server` (the
real server under load), then the pure output side: `stats`, `figures`, `targets`, `report`
and `plot`. Not a test suite: it reports figures and asserts nothing about speed.
"""
