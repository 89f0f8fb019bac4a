from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from grantkey.domain import tokens
from grantkey.domain.secrets_box import SecretBox, scram_verifier

SCANNER = re.compile(r"gk[mr][0-9A-Za-z]{38}")


def test_token_format_is_alphanumeric_with_type_prefix_and_checksum() -> None:
    master, regular = tokens.new_token("master"), tokens.new_token("regular")
    assert master.startswith("gkm") and regular.startswith("gkr")
    for token in (master, regular):
        assert len(token) == 41
        assert SCANNER.fullmatch(token)
        assert tokens.is_well_formed(token)


def test_tokens_are_unique() -> None:
    assert len({tokens.new_token("regular") for _ in range(2000)}) == 2000


def test_default_public_token_is_well_formed() -> None:
    assert tokens.is_well_formed("default_public")


@given(st.integers(min_value=0, max_value=40), st.sampled_from(tokens.BASE62))
def test_token_with_any_single_character_changed_fails_the_checksum(
    position: int, replacement: str
) -> None:
    token = tokens.new_token("regular")
    if token[position] == replacement:
        return
    changed = token[:position] + replacement + token[position + 1:]
    assert not tokens.is_well_formed(changed)


@given(st.text(max_size=60))
def test_random_text_is_not_a_token(text: str) -> None:
    if text != "default_public":
        assert not tokens.is_well_formed(text) or SCANNER.fullmatch(text)


def test_sealed_token_round_trips_and_is_bound_to_its_row() -> None:
    box = SecretBox(b"x" * 32)
    sealed = box.encrypt_token("gkrSECRET", b"row-1")
    assert b"gkrSECRET" not in sealed
    assert box.decrypt_token(sealed, b"row-1") == "gkrSECRET"
    try:
        box.decrypt_token(sealed, b"row-2")
    except Exception as error:  # cryptography's InvalidTag
        assert type(error).__name__ == "InvalidTag"
    else:
        raise AssertionError("a sealed token opened under another row's id")


def test_role_password_depends_on_secret_role_and_token() -> None:
    one, two = SecretBox(b"a" * 32), SecretBox(b"b" * 32)
    assert one.role_password("r", "t") != two.role_password("r", "t")
    assert one.role_password("r", "t") != one.role_password("r2", "t")
    assert one.role_password("r", "t") != one.role_password("r", "t2")
    assert one.role_password("r", "t") == one.role_password("r", "t")


def test_scram_verifier_has_postgresql_format_and_hides_the_password() -> None:
    verifier = scram_verifier("hunter2")
    assert re.fullmatch(r"SCRAM-SHA-256\$16:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+",
                        verifier)
    assert "hunter2" not in verifier
