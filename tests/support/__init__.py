"""What the tests and the benchmarks share, and nothing the server needs (so it is not installed): the
server started as a child process (launcher), headless Chromium's flags (chromium), Telugu test speech
(speech), assertions and waits on a running server (helpers), the pytest fixtures both load (fixtures),
and the ring tests' child processes (rings).

bench/ imports it as `tests.support`, so its scripts run as modules from the repository root:
`python -m bench.capacity_cpu ...`.
"""
