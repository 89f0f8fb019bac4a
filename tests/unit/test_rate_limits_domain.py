"""GCRA as redis-cell decides it, the settings' REQUESTS/SECONDS[/BURST] text, and the
bucket file shared by processes: atomic across them (no request admitted twice)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from grantkey.domain.rate_limits import Decision, Rate, gcra, parse_rate, stricter
from grantkey.errors import SetupError
from grantkey.services.rate_store import SharedBuckets
from grantkey.settings import Settings


def run(rate: Rate, moments: list[float]) -> list[Decision]:
    tat: float | None = None
    decisions = []
    for now in moments:
        new_tat, decision = gcra(tat, now, rate)
        tat = new_tat if new_tat is not None else tat
        decisions.append(decision)
    return decisions


def test_a_burst_then_one_request_per_emission_interval() -> None:
    rate = Rate(requests=2, per=1, burst=3)  # one every 0.5 s, 4 at once
    decisions = run(rate, [100.0] * 5 + [100.5, 100.5, 102.5])
    assert [d.allowed for d in decisions] == [True] * 4 + [False, True, False, True]
    assert [d.remaining for d in decisions[:5]] == [3, 2, 1, 0, 0]
    assert decisions[0].limit == 4
    assert decisions[4].retry_after == pytest.approx(0.5)
    assert decisions[4].reset_after == pytest.approx(2.0)
    assert decisions[-1].remaining == 3  # 2 s later: nearly full again


def test_headers_are_integers_and_retry_after_only_on_a_refusal() -> None:
    allowed, refused = run(Rate(1, 60), [0.0, 1.0])
    assert allowed.headers() == {"Carto-Rate-Limit-Limit": "1", "Carto-Rate-Limit-Remaining": "0",
                                 "Carto-Rate-Limit-Reset": "60"}
    assert refused.headers()["Retry-After"] == "59"
    tiny = run(Rate(1000, 1), [0.0, 0.0])[1]
    assert tiny.headers()["Retry-After"] == "1"  # never 0: the SDK would not back off


def test_a_bucket_from_a_clock_that_went_back_counts_as_full() -> None:
    rate = Rate(1, 10)
    _, decision = gcra(1_000_000.0, 5.0, rate)
    assert decision.allowed


def test_the_stricter_decision_is_a_refusal_else_the_fewer_left() -> None:
    ok_many, ok_few = Decision(True, 10, 8, -1, 1), Decision(True, 3, 1, -1, 1)
    no = Decision(False, 10, 0, 2, 5)
    assert stricter(ok_many, ok_few) == ok_few
    assert stricter(ok_few, no) == no and stricter(no, ok_few) == no
    assert stricter(None, ok_few) == ok_few and stricter(ok_many, None) == ok_many


@pytest.mark.parametrize(("text", "rate"), [("0", None), ("", None), ("100/60", Rate(100, 60, 0)),
                                            ("5/0.5/2", Rate(5, 0.5, 2)), (" 3/1/0 ", Rate(3, 1, 0))])
def test_setting_text(text: str, rate: Rate | None) -> None:
    assert parse_rate(text) == rate
    if rate is not None:
        assert parse_rate(str(rate)) == rate  # what serve hands its workers


@pytest.mark.parametrize("text", ["100", "a/b", "1/2/3/4", "0/60", "5/0", "5/100000", "5/1/-1"])
def test_a_wrong_setting_stops_the_start_naming_the_variable(text: str) -> None:
    with pytest.raises(SetupError, match=r"^GRANTKEY_RATE_LIMIT_SQL (must be|requests|per|"
                                         r"burst)"):
        Settings.from_env({"GRANTKEY_RATE_LIMIT_SQL": text})


def _hammer(path: str, count: int, results: multiprocessing.Queue[int]) -> None:
    buckets = SharedBuckets(Path(path))
    rate = Rate(1, 3600, 99)  # 100 at once, then one an hour
    results.put(sum(buckets.take_now(b"shared", rate, 1000.0).allowed for _ in range(count)))


def test_processes_sharing_the_file_admit_exactly_the_limit(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_hammer, args=(str(tmp_path / "b.bin"), 150, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    admitted = sum(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(30)
    assert admitted == 100


def test_a_full_table_forgets_a_bucket_rather_than_refusing_wrongly(tmp_path: Path) -> None:
    buckets = SharedBuckets(tmp_path / "b.bin")
    rate = Rate(1, 3600)
    assert all(buckets.take_now(f"k{i}".encode(), rate, 50.0).allowed for i in range(20_000))
    assert not buckets.take_now(b"k19999", rate, 50.0).allowed  # still remembered


def test_raw_headers_say_what_headers_say() -> None:
    for decision in run(Rate(3, 7, 2), [0.0, 0.5, 0.9]):
        assert {name.decode(): value.decode() for name, value in decision.raw_headers()} == {
            name.lower(): value for name, value in decision.headers().items()}
