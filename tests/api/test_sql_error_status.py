"""The SQL API's error status comes from the SQLSTATE as well as CARTO's wording rule
(carto-compat.md §5): 403 for an insufficient-privilege error saying "permission denied";
any other refusal, and the words "permission denied" inside a value or a user's own
message, answer 400."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account

pytestmark = pytest.mark.in_process


@pytest.mark.parametrize("statement", [
    "SELECT 'permission denied'::int",
    "DO $$BEGIN RAISE EXCEPTION 'permission denied, said nobody'; END$$",
    "SELECT * FROM \"permission denied\"",
])
def test_the_words_permission_denied_in_a_value_or_message_answer_400(
    http: httpx.Client, account: Account, statement: str,
) -> None:
    response = account.sql(http, statement, account.master_token)
    assert response.status_code == 400, response.text
    assert "permission denied" in response.text


def test_a_real_permission_error_answers_403_and_must_be_owner_stays_400(
    http: httpx.Client, account: Account, owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(account, "CREATE TABLE secrets (s text)")
    denied = account.sql(http, "SELECT * FROM secrets")
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"] == ["permission denied for table secrets"]
    raised = account.sql(http, "DO $$BEGIN RAISE EXCEPTION 'permission denied for the demo' "
                               "USING ERRCODE = '42501'; END$$", account.master_token)
    assert raised.status_code == 403, raised.text
    owner_sql(account, "GRANT SELECT ON secrets TO PUBLIC")
    owner = account.sql(http, "ALTER TABLE secrets ADD COLUMN x int")
    assert owner.status_code == 400 and "must be owner of table secrets" in owner.text
