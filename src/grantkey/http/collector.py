"""The serving process's cyclic garbage collector.

A request frees its objects by reference counting (tests/db/test_no_cyclic_garbage.py keeps
it so); what triggers the collector is the burst of objects alive while 64 requests are in
flight. With CPython's default first threshold (700) that meant ~40 collections per second
per worker, and a full pass every few seconds over every pooled connection's objects (1,600
connections per worker at the default caps): 8% of a worker's CPU time, 25-35% before the
per-request cycles were broken. Measured with gc.callbacks under wrk, 10-row query, one key:
default thresholds 400 young and 3 full collections per 10 s; first threshold 5,000: 0-1.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 5_000


def tune_collector() -> None:
    """Collect the young generation less often, and leave what start-up built (modules,
    the app, settings) out of every later pass: it lives as long as the process."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()
