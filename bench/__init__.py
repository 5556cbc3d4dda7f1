"""Benchmarks of the relay (issue 7): throughput, latency, connection scale, drain, footprint.

Run ``python -m bench all`` (or one of ``throughput latency scale drain footprint``); add
``--quick`` for a small run. Every bench starts its own processes on 127.0.0.1 with temporary
data dirs, prints a table of its parameters and figures, and asserts nothing about time: the
figures depend on the machine, so they are compared with the targets in docs/performance.md by
a person, not by CI.
"""
