"""The serving process's collector settings (grantkey.http.collector)."""

from __future__ import annotations

import gc

from grantkey.http.collector import YOUNG_THRESHOLD, tune_collector


def test_tuning_raises_the_young_threshold_and_freezes_what_start_up_built() -> None:
    before = gc.get_threshold()
    try:
        kept: object = type("Kept", (), {})()  # a tracked object from "start-up"
        tune_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        assert not any(thing is kept for thing in gc.get_objects())  # left out of passes
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
