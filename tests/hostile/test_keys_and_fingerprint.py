"""Hostile input for the key parser and fingerprinting: any bytes, never a crash."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oncely import MalformedKey
from oncely._fingerprint import fingerprint
from oncely._keys import MAX_KEY_LENGTH, parse_key, storage_key

FAST = settings(max_examples=300, deadline=None)


@FAST
@given(st.binary(max_size=2 * MAX_KEY_LENGTH))
def test_any_header_bytes_give_a_key_or_malformed_key(raw: bytes) -> None:
    try:
        key = parse_key(raw)
    except MalformedKey:
        return
    assert 1 <= len(key) <= MAX_KEY_LENGTH
    assert all("\x21" <= ch <= "\x7e" for ch in key)


@FAST
@given(st.text(max_size=2 * MAX_KEY_LENGTH))
def test_any_header_text_gives_a_key_or_malformed_key(raw: str) -> None:
    with contextlib.suppress(MalformedKey):
        parse_key(raw)


def test_key_over_the_limit_is_malformed() -> None:
    parse_key("k" * MAX_KEY_LENGTH)
    with pytest.raises(MalformedKey):
        parse_key("k" * (MAX_KEY_LENGTH + 1))


@FAST
@given(st.text(), st.text(), st.text(), st.text())
def test_tenant_and_key_never_collide_by_concatenation(t1: str, k1: str, t2: str, k2: str) -> None:
    if (t1, k1) != (t2, k2):
        assert storage_key(t1, k1) != storage_key(t2, k2)
    # A separator moved between tenant and key still makes another storage key.
    assert storage_key(t1 + ":", k1) != storage_key(t1, ":" + k1)


@FAST
@given(
    st.text(max_size=10),
    st.text(max_size=40),
    st.text(max_size=40),
    st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["application/json", "x/y+json"])),
    st.binary(max_size=200),
    st.lists(st.text(max_size=10), max_size=3),
)
def test_fingerprint_is_total_and_versioned(
    method: str, path: str, query: str, content_type: str | None, body: bytes, ignore: list[str]
) -> None:
    fp = fingerprint(method, path, query, content_type, body, ignore)
    assert fp.startswith("v1:")
    assert len(fp) == 3 + 64
    assert fp == fingerprint(method, path, query, content_type, body, ignore)
