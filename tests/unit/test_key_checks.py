"""The per-request checks of a key with an expiry, restrictions and a rate limit, worked out
once where they can be (the stop moment, each address's verdict) and taken together where
they are shared (a request's buckets, all or none): the results are the same as checking
everything afresh, and a refused request costs no bucket anything."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from grantkey.domain.keys import KeyRecord, KeyType, Principal, User
from grantkey.domain.rate_limits import Rate
from grantkey.domain.restrictions import VERDICTS_KEPT, read_restrictions
from grantkey.errors import KeyExpired, RateLimited, Unauthorized
from grantkey.http.cors import RATE_HEADERS, with_cors_headers
from grantkey.services import rate_store
from grantkey.services.rate_limits import RateLimits
from grantkey.services.rate_store import SharedBuckets
from grantkey.services.resolver import usable

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def principal(rate: Rate | None = None, expires_at: datetime | None = None,
              token_until: datetime | None = None) -> Principal:
    record = KeyRecord(id="k1", name="guarded", type=KeyType.REGULAR, role="r",
                       token_digest=b"", sealed_token=None, apis=("sql",), services=(),
                       table_metadata=False, created_at=NOW, updated_at=NOW,
                       expires_at=expires_at, rate_limit=rate)
    return Principal(User("u1", "alice", "db", "o", "p", NOW), record, "token",
                     token_until=token_until)


def test_a_key_is_refused_from_the_moment_it_expires_not_a_microsecond_later() -> None:
    expiring = principal(expires_at=NOW)
    assert usable(expiring, NOW.timestamp() - 1e-6) is expiring
    with pytest.raises(KeyExpired):
        usable(expiring, NOW.timestamp())
    assert usable(principal(), NOW.timestamp() + 1e9).stop_time is None  # no expiry


def test_an_old_tokens_grace_ends_before_its_keys_expiry_when_sooner() -> None:
    old = principal(expires_at=NOW + timedelta(days=1), token_until=NOW)
    assert old.stop_time == NOW.timestamp()
    with pytest.raises(Unauthorized) as refused:
        usable(old, NOW.timestamp())
    assert not isinstance(refused.value, KeyExpired)  # the grace ended, not the key
    with pytest.raises(KeyExpired):
        usable(old, (NOW + timedelta(days=1)).timestamp())


def test_an_address_verdict_is_remembered_within_bounds_and_stays_right() -> None:
    restrictions, problems = read_restrictions({"ips": ["10.0.0.0/8"]})
    assert restrictions is not None and not problems
    for round_ in range(3):  # past the bound the verdicts are forgotten, never wrong
        for index in range(VERDICTS_KEPT + 10):
            inside = f"10.0.{index // 256}.{index % 256}"
            outside = f"11.0.{index // 256}.{index % 256}"
            assert restrictions.allows_address(inside), (round_, inside)
            assert not restrictions.allows_address(outside), (round_, outside)
            assert len(restrictions._verdicts) <= VERDICTS_KEPT
            assert restrictions._verdicts[outside] is False  # remembered
    assert not restrictions.allows_address("not an address")


def test_a_request_one_bucket_refuses_costs_the_other_nothing(tmp_path: Path) -> None:
    buckets = SharedBuckets(tmp_path / "b.bin")
    roomy, strict = Rate(10, 60, 9), Rate(1, 3600)
    both = [(b"roomy", roomy, 1), (b"strict", strict, 1)]
    assert [d.remaining for d in buckets.take_all_now(both, 50.0)] == [9, 0]
    refused = buckets.take_all_now(both, 50.0)
    assert [d.allowed for d in refused] == [True, False]
    assert buckets.take_now(b"roomy", roomy, 50.0).remaining == 8  # not 7: nothing taken
    assert [d.allowed for d in buckets.take_all_now(both[::-1], 50.0)] == [False, True]
    assert buckets.take_now(b"roomy", roomy, 50.0).remaining == 7


def test_two_new_buckets_on_one_free_slot_are_both_kept(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rate_store, "SLOTS", 2)  # a tiny table: both start on the same slot
    buckets = SharedBuckets(tmp_path / "b.bin")
    rate = Rate(1, 3600)
    pair = [(b"k:a", rate, 1), (b"k:b", rate, 1)]
    assert [d.allowed for d in buckets.take_all_now(pair, 50.0)] == [True, True]
    assert not buckets.take_now(b"k:a", rate, 51.0).allowed  # both remembered
    assert not buckets.take_now(b"k:b", rate, 51.0).allowed


def test_a_users_limit_refusing_leaves_the_keys_bucket_as_it_was(tmp_path: Path) -> None:
    limits = RateLimits(SharedBuckets(tmp_path / "b.bin"), {"sql": "1/3600"}, "0")
    who = principal(rate=Rate(100, 60, 4))
    first = asyncio.run(limits.check(who, "sql"))
    assert first is not None and first.remaining == 0  # the stricter: the user's
    for _ in range(3):
        with pytest.raises(RateLimited) as refused:
            asyncio.run(limits.check(who, "sql"))
        assert "all keys together" in str(refused.value.hint)
    key_only = asyncio.run(limits.check(who, None))
    assert key_only is not None and key_only.remaining == 3  # one taken in all, then this


def test_rate_headers_are_exposed_to_scripts_once_and_only_on_limited_answers() -> None:
    plain = with_cors_headers([(b"content-type", b"text/plain")])
    assert plain == [(b"content-type", b"text/plain"), (b"access-control-allow-origin", b"*")]
    limited = with_cors_headers([(b"carto-rate-limit-limit", b"5")])
    assert (b"access-control-expose-headers", RATE_HEADERS) in limited
    maps = with_cors_headers([(b"Access-Control-Expose-Headers", b"X-Layergroup-Id"),
                              (b"carto-rate-limit-limit", b"5"),
                              (b"access-control-allow-origin", b"https://a.example")])
    assert maps == [(b"access-control-expose-headers", b"X-Layergroup-Id, " + RATE_HEADERS),
                    (b"carto-rate-limit-limit", b"5"),
                    (b"access-control-allow-origin", b"https://a.example")]
    assert with_cors_headers(list(maps)) == maps  # already exposed: left as it is
