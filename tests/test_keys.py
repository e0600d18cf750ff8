"""Parsing the Idempotency-Key header, and the storage key made from it."""

from __future__ import annotations

import pytest

from oncely import MalformedKey, parse_key, storage_key
from oncely._keys import MAX_KEY_LENGTH

UUID = "8e03978e-40d5-43e8-bc93-6894a57f9324"


# Accepted keys ----------------------------------------------------------------------------


def test_a_structured_field_string_gives_the_key_inside_the_quotes() -> None:
    """The draft's form, a quoted sf-string, yields the characters between the quotes."""
    assert parse_key(f'"{UUID}"') == UUID


def test_a_bare_token_is_the_key_as_sent() -> None:
    """Stripe's form, a bare token, is taken as the key itself."""
    assert parse_key(UUID) == UUID
    assert parse_key("pay_1Hh1XYZ2eZvKYlo2C") == "pay_1Hh1XYZ2eZvKYlo2C"


def test_bytes_and_str_header_values_parse_alike() -> None:
    """The raw ASGI header bytes give the same key as the decoded text."""
    assert parse_key(UUID.encode()) == parse_key(UUID) == UUID


def test_escaped_quote_and_backslash_are_unescaped() -> None:
    """Inside an sf-string, backslash-quote and double backslash stand for one character."""
    assert parse_key(r'"a\"b"') == 'a"b'
    assert parse_key(r'"a\\b"') == "a\\b"


def test_surrounding_optional_whitespace_is_not_part_of_the_key() -> None:
    """Spaces and tabs around the field value (HTTP OWS) are dropped."""
    assert parse_key(f" \t{UUID} ") == UUID
    assert parse_key(f' "{UUID}"\t') == UUID


def test_every_visible_ascii_character_is_allowed() -> None:
    """Any of %x21-7E may appear in a bare key."""
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    assert parse_key(visible) == visible


@pytest.mark.parametrize("length", [1, MAX_KEY_LENGTH])
def test_keys_of_1_and_255_characters_are_accepted(length: int) -> None:
    """The bounds of the allowed length are inclusive, bare or quoted."""
    key = "k" * length
    assert parse_key(key) == key
    assert parse_key(f'"{key}"') == key


# Refused keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param('""', id="empty-sf-string"),
        pytest.param("   ", id="only-spaces"),
        pytest.param("k" * (MAX_KEY_LENGTH + 1), id="256-chars"),
        pytest.param('"' + "k" * (MAX_KEY_LENGTH + 1) + '"', id="256-chars-quoted"),
        pytest.param("a b", id="inner-space"),
        pytest.param('"a b"', id="inner-space-quoted"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\x7fb", id="del"),
        pytest.param('"a\x01b"', id="control-quoted"),
        pytest.param("caf\u00e9", id="non-ascii-str"),
        pytest.param('"caf\u00e9"', id="non-ascii-quoted"),
        pytest.param(r'"a\nb"', id="escape-of-n"),
        pytest.param('"ab\\"', id="trailing-backslash"),
        pytest.param('"a"b"', id="unescaped-quote"),
    ],
)
def test_malformed_keys_are_refused(raw: str) -> None:
    """Empty, too long, spaces, controls, non-ASCII and bad escapes are MalformedKey."""
    with pytest.raises(MalformedKey):
        parse_key(raw)


def test_non_ascii_header_bytes_are_refused() -> None:
    """Header bytes that are not ASCII are refused, not decoded some other way."""
    with pytest.raises(MalformedKey):
        parse_key("caf\u00e9".encode())
    with pytest.raises(MalformedKey):
        parse_key(b"key-\xff")


def test_a_malformed_key_answers_400_with_a_problem_that_says_what_to_send() -> None:
    """MalformedKey is a 400 problem whose detail names the allowed form."""
    with pytest.raises(MalformedKey) as caught:
        parse_key("a b")
    problem = caught.value.to_dict()
    assert problem["status"] == 400
    assert problem["type"] == "https://oncely.dev/problems/malformed-idempotency-key"
    assert "1-255 visible ASCII" in str(problem["detail"])


# The storage key --------------------------------------------------------------------------


def test_the_storage_key_never_equals_nor_contains_the_raw_key() -> None:
    """The store sees a SHA-256 hex digest, not the client's key."""
    for key in (UUID, "order-42", "Zz_not-hex!"):
        stored = storage_key("tenant-a", key)
        assert stored != key
        assert key not in stored
        assert len(stored) == 64
        assert set(stored) <= set("0123456789abcdef")


def test_the_storage_key_is_stable() -> None:
    """The same (scope, key) always maps to the same storage key."""
    assert storage_key("tenant-a", UUID) == storage_key("tenant-a", UUID)


def test_two_tenants_with_the_same_key_get_different_storage_keys() -> None:
    """Scopes separate identical keys, so two tenants' keys never meet."""
    assert storage_key("tenant-a", UUID) != storage_key("tenant-b", UUID)


def test_the_parts_cannot_be_shifted_into_each_other() -> None:
    """Moving characters between scope and key gives another storage key (length-prefixed)."""
    assert storage_key("ab", "c") != storage_key("a", "bc")
    assert storage_key("", "abc") != storage_key("abc", "")


def test_namespaces_separate_storage_keys() -> None:
    """The same scope and key under two namespaces are two storage keys."""
    assert storage_key("t", UUID, "app-1") != storage_key("t", UUID, "app-2")
    assert storage_key("t", UUID) != storage_key("t", UUID, "app-1")


def test_an_sf_string_with_parameters_is_the_same_key() -> None:
    """RFC 8941 Items may carry parameters; the key is the string alone."""
    assert parse_key('"abc";p=1') == parse_key('"abc"') == "abc"


@pytest.mark.parametrize("value", ['"abc', '"abc"x', '"abc" x'])
def test_a_broken_quoted_string_is_malformed(value: str) -> None:
    with pytest.raises(MalformedKey):
        parse_key(value)
