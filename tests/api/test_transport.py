"""How a key travels (carto-compat §2), over real HTTP on the Auth API."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.conftest import Account
from tests.support import apis_only

pytestmark = pytest.mark.in_process


def basic(username: str, token: str) -> dict[str, str]:
    raw = base64.b64encode(f"{username}:{token}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def test_basic_auth_with_token_as_password(http: httpx.Client, account: Account) -> None:
    response = http.get(account.keys_url, headers=basic(account.username, account.master_token))
    assert response.status_code == 200 and response.json()["total"] == 2


def test_basic_username_mismatch_is_401_on_the_auth_api(
    http: httpx.Client, make_account: object
) -> None:
    one, two = make_account(), make_account()  # type: ignore[operator]
    response = http.get(one.keys_url, headers=basic(two.username, one.master_token))
    assert response.status_code == 401 and response.content == b""


def test_basic_header_never_falls_through_to_query(http: httpx.Client, account: Account) -> None:
    response = http.get(account.keys_url, params=account.master(),
                        headers=basic(account.username, "wrong"))
    assert response.status_code == 401


def test_malformed_basic_is_401(http: httpx.Client, account: Account) -> None:
    for header in ("Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode(),
                   "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Digest abc"):
        response = http.get(account.keys_url, params=account.master(),
                            headers={"Authorization": header})
        assert response.status_code == 401


def test_bearer_token(http: httpx.Client, account: Account) -> None:
    response = http.get(account.keys_url,
                        headers={"Authorization": f"Bearer {account.master_token}"})
    assert response.status_code == 200


def test_basic_wins_over_query(http: httpx.Client, account: Account) -> None:
    response = http.get(account.keys_url, params={"api_key": "bogus"},
                        headers=basic(account.username, account.master_token))
    assert response.status_code == 200


def test_query_api_key_wins_over_body(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params={"api_key": "bogus"},
                         json={"api_key": account.master_token, "name": "x",
                               "grants": apis_only("sql")})
    assert response.status_code == 401


def test_api_key_in_json_body(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, json={"api_key": account.master_token, "name": "b",
                                                 "grants": apis_only("sql")})
    assert response.status_code == 201


def test_api_key_in_form_body(http: httpx.Client, account: Account) -> None:
    response = http.post(f"{account.keys_url}/Master/token/regenerate",
                         data={"api_key": account.master_token})
    assert response.status_code == 200


def test_api_key_in_multipart_body(http: httpx.Client, account: Account) -> None:
    response = http.post(f"{account.keys_url}/Master/token/regenerate",
                         data={"api_key": account.master_token},
                         files={"unused": ("f.txt", b"x")})
    assert response.status_code == 200


def test_no_key_on_the_auth_api_is_401_empty_body(http: httpx.Client, account: Account) -> None:
    response = http.get(account.keys_url)
    assert response.status_code == 401 and response.content == b""


def test_unknown_token_is_401_empty_body(http: httpx.Client, account: Account) -> None:
    last = "y" if account.master_token.endswith("x") else "x"  # one character off, never equal
    for token in ("nope", "gkr" + "A" * 38, account.master_token[:-1] + last):
        response = http.get(account.keys_url, params={"api_key": token})
        assert response.status_code == 401 and response.content == b""


def test_another_users_valid_key_is_unknown_here(
    http: httpx.Client, make_account: object
) -> None:
    one, two = make_account(), make_account()  # type: ignore[operator]
    response = http.get(one.keys_url, params={"api_key": two.master_token})
    assert response.status_code == 401
    response = http.get(one.keys_url, headers={"Authorization": f"Bearer {two.master_token}"})
    assert response.status_code == 401


def test_body_over_the_size_limit_is_413(http: httpx.Client, account: Account) -> None:
    response = http.post(account.keys_url, params=account.master(),
                         content=b"{" + b" " * 2_000_000 + b"}",
                         headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "too large" in response.json()["errors"]
