"""The credential resolver: order of sources, and no crash on any bytes."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grantkey.errors import BasicUserMismatch, Unauthorized
from grantkey.http.auth import extract_credential
from grantkey.http.params import Params


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_basic_decodes_the_whole_rfc7617_credential() -> None:
    credential = "alice:a?>~?>tok"  # base64 of this contains '+', '/' and '='
    encoded = b64(credential)
    assert set("+/=") & set(encoded)
    found = extract_credential(f"Basic {encoded}", Params({}), "alice", data_api=False)
    assert found.token == "a?>~?>tok"


def test_basic_for_another_user_is_a_mismatch() -> None:
    with pytest.raises(BasicUserMismatch):
        extract_credential(f"Basic {b64('bob:tok')}", Params({}), "alice", data_api=True)


def test_order_query_then_body_and_map_key_only_on_data_apis() -> None:
    params = Params({"map_key": "m"}, body={"api_key": "b"})
    assert extract_credential(None, params, "a", data_api=True).token == "m"
    assert extract_credential(None, params, "a", data_api=False).token == "b"
    assert extract_credential(None, Params({"api_key": "q"}, body={"api_key": "b"}), "a",
                              data_api=True).token == "q"
    assert extract_credential(None, Params({"api_key": ""}), "a", data_api=True).token is None


@given(st.text(max_size=200))
def test_any_authorization_header_resolves_or_is_refused_cleanly(header: str) -> None:
    with contextlib.suppress(Unauthorized):
        extract_credential(header, Params({}), "alice", data_api=True)


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=30)),
       st.dictionaries(st.text(max_size=10), st.one_of(st.text(), st.integers(), st.none())))
def test_any_query_or_body_resolves_cleanly(query: dict[str, str], body: dict[str, object]) -> None:
    credential = extract_credential(None, Params(query, body=body), "alice", data_api=True)
    assert credential.token is None or isinstance(credential.token, str)
