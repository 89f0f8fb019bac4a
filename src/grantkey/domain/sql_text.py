"""What little grantkey reads in a client's SQL text: whether a statement starts a COPY.

This decides no permission (PostgreSQL does that). It lets the SQL API refuse COPY to or
from the client *before* anything runs: once a COPY has started, the only way out is to
close the session, and a COPY ... TO STDOUT does not wait for the client, so statements
sent with it may already have committed. The protocol-level refusal in `db.pg_wire` stays
as the backstop for anything this lexer would miss.

The lexer knows what can hide a semicolon or a keyword: '' strings (with and without
backslash escapes, since a client can turn `standard_conforming_strings` off in an earlier
statement: both readings are tried), "" identifiers, $tag$ strings, -- and nested /* */
comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_SPACE = " \t\n\r\f\v"
COPY_REFUSED = ("COPY to or from the client (COPY ... TO STDOUT, COPY ... FROM STDIN) is not "
                "supported on the SQL API endpoint")


def starts_a_copy(query: str) -> bool:
    """True if a top-level statement of `query` begins with the keyword COPY."""
    if "copy" not in query.lower():
        return False  # the usual case costs one scan
    return any(word.lower() == "copy"
               for escapes in (False, True) for word in first_words(query, escapes))


def first_words(query: str, backslash_escapes: bool = False) -> Iterator[str]:
    """The first word of each statement, read as PostgreSQL would split `query`."""
    i, n, at_start = 0, len(query), True
    while i < n:
        char = query[i]
        if char in _SPACE:
            i += 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            i = _after_block_comment(query, i)
        elif char == ";":
            at_start, i = True, i + 1
        elif char == "'":
            escaped = backslash_escapes or _escape_prefix(query, i)
            at_start, i = False, _after_quoted(query, i, "'", escaped)
        elif char == '"':
            at_start, i = False, _after_quoted(query, i, '"', False)
        elif char == "$" and (tag := _DOLLAR_TAG.match(query, i)) and not _in_word(query, i):
            end = query.find(tag.group(), tag.end())
            at_start, i = False, n if end < 0 else end + len(tag.group())
        elif word := _WORD.match(query, i):
            if at_start:
                yield word.group()
            at_start, i = False, word.end()
        else:
            at_start, i = False, i + 1


def _after_block_comment(query: str, i: int) -> int:
    depth, i = 1, i + 2
    while i < len(query) and depth:
        if query.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif query.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _after_quoted(query: str, i: int, quote: str, backslash_escapes: bool) -> int:
    i += 1
    while i < len(query):
        char = query[i]
        if backslash_escapes and char == "\\":
            i += 2
        elif char == quote:
            if query.startswith(quote, i + 1):  # a doubled quote stands for itself
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return i


def _escape_prefix(query: str, i: int) -> bool:
    """E'...' (escape string syntax): backslashes escape whatever the settings say."""
    return i > 0 and query[i - 1] in "eE" and not (i > 1 and _is_word_char(query[i - 2]))


def _in_word(query: str, i: int) -> bool:
    return i > 0 and _is_word_char(query[i - 1])


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "_$" or ord(char) >= 0x80
