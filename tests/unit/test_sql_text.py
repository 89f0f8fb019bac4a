"""The lexer that finds COPY statements before a query is sent (grantkey/domain/sql_text.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grantkey.domain.sql_text import first_words, starts_a_copy


@pytest.mark.parametrize("query", [
    "COPY (SELECT 1) TO STDOUT",
    "  copy t FROM stdin",
    "SELECT 1; COPY t TO STDOUT",
    "SELECT 'a;b'; CoPy t TO STDOUT",
    "/* a /* nested */ comment */ COPY t TO STDOUT",
    "-- comment\nCOPY t TO STDOUT",
    "SELECT $$;$$; COPY t TO STDOUT",
    "SELECT $tag$ $$ ; $tag$;COPY t TO STDOUT",
    'SELECT "a;""b"; COPY t TO STDOUT',
    "SELECT E'\\';'; COPY t TO STDOUT",  # E'' strings: \' does not end the string
    # standard_conforming_strings off makes \' an escape in plain strings too: both readings
    "SET standard_conforming_strings = off; SELECT 'a\\''; COPY t TO STDOUT",
    "SELECT 'a\\'; COPY t TO STDOUT; SELECT ''",
    ";;COPY t TO STDOUT",
])
def test_a_copy_statement_is_found_wherever_it_stands(query: str) -> None:
    assert starts_a_copy(query)


@pytest.mark.parametrize("query", [
    "SELECT 1",
    "SELECT 'COPY t TO STDOUT'",
    "SELECT 1 AS copy",
    "SELECT copy FROM copies",
    "-- COPY t TO STDOUT\nSELECT 1",
    "/* ; COPY t TO STDOUT */ SELECT 1",
    "SELECT $$; COPY t TO STDOUT$$",
    'SELECT "x; COPY t TO STDOUT"',
    "CREATE TABLE copy_log (a int)",
    "SELECT copy_of FROM t; SELECT 2",
])
def test_copy_in_strings_comments_and_names_is_not_a_copy(query: str) -> None:
    assert not starts_a_copy(query)


def test_first_words_split_statements_as_postgresql_does() -> None:
    query = "select 1; /* x; */ INSERT INTO t VALUES (';'); $a$ ; $a$; with x as (select 1) table x"
    assert list(first_words(query)) == ["select", "INSERT", "with"]


@given(st.text(max_size=300))
def test_any_text_is_read_to_its_end_without_error(text: str) -> None:
    for escapes in (False, True):
        list(first_words(text, escapes))
    starts_a_copy(text)


@given(st.text(alphabet="';\"$/*-\\\n aCOPYc", max_size=200))
def test_a_query_that_begins_with_copy_is_always_found(tail: str) -> None:
    assert starts_a_copy("COPY " + tail)
