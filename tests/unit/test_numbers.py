"""One strict integer parser for every number a client sends (page, per_page,
rows_per_page, dp, Content-Length): digits that int() refuses ("²", "٣") are bad input,
never a 500."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grantkey.domain.numbers import strict_int
from grantkey.errors import BadInput, BadListParameter
from grantkey.http.auth_api import parse_list_query
from grantkey.http.sql_api import _integer


@pytest.mark.parametrize(("text", "value"), [
    ("7", 7), (" 12 ", 12), ("-3", -3), ("0", 0), ("²", None), ("٣", None), ("1e3", None),
    ("", None), ("+1", None), ("1_000", None), ("12a", None), ("９", None),
])
def test_only_ascii_digits_are_integers(text: str, value: int | None) -> None:
    assert strict_int(text) == value


@given(st.text(max_size=30))
def test_any_text_is_an_integer_or_none(text: str) -> None:
    value = strict_int(text)
    if value is not None:
        assert value == int(text.strip()) and text.strip().lstrip("-").isascii()


@given(st.text(max_size=30))
def test_list_parameters_answer_bad_input_for_any_text(text: str) -> None:
    for name in ("page", "per_page"):
        with contextlib.suppress(BadListParameter):
            parse_list_query({name: text})


@given(st.text(max_size=30))
def test_sql_parameters_answer_bad_input_for_any_text(text: str) -> None:
    for name, low, high in (("rows_per_page", 1, 10**6), ("page", 0, 10**9), ("dp", 0, 15)):
        with contextlib.suppress(BadInput):
            _integer(text, name, low, high)
