"""Request fingerprints: one for requests that mean the same, another for any real change."""

from __future__ import annotations

import pytest

from oncely import fingerprint
from oncely._fingerprint import FINGERPRINT_VERSION, canonical_json, normalize_query

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
BASE = b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}'


def fp(
    body: bytes = BASE,
    *,
    method: str = "POST",
    path: str = "/payments",
    query: str = "",
    content_type: str | None = JSON,
    ignore: tuple[str, ...] = (),
) -> str:
    return fingerprint(method, path, query, content_type, body, ignore)


# Equivalent JSON: one fingerprint ---------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"customer":{"tags":["a","b"],"id":"cus_1"},"currency":"EUR","amount":1000}',
            id="key-order",
        ),
        pytest.param(
            b' {\n  "amount" : 1000 ,\n\t"currency":"EUR", "customer" : {"id" : "cus_1",'
            b' "tags" : [ "a" , "b" ] } }\n',
            id="whitespace",
        ),
        pytest.param(
            b'{"amount":1000.0,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="1000-vs-1000.0",
        ),
        pytest.param(
            b'{"amount":1e3,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="exponent",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"\\u0045UR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="unicode-escape",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus\\u005f1","tags":["\\u0061","b"]}}',
            id="unicode-escape-nested",
        ),
    ],
)
def test_equivalent_json_bodies_share_one_fingerprint(body: bytes) -> None:
    """Key order, whitespace, number spelling and escapes do not change the fingerprint."""
    assert fp(body) == fp(BASE)


def test_escaped_and_literal_non_ascii_characters_agree() -> None:
    """A non-ASCII character written literally or as a \\u escape is one string."""
    assert fp('{"name":"caf\u00e9"}'.encode()) == fp(b'{"name":"caf\\u00e9"}')


def test_json_media_type_parameters_and_suffixes_count_as_json() -> None:
    """application/json with a charset, and */*+json, are canonicalized as JSON."""
    reordered = b'{"b":2,"a":1}'
    canonical = b'{"a":1,"b":2}'
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "x/y+json"):
        assert fp(reordered, content_type=content_type) == fp(canonical, content_type=content_type)


def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    """The canonical form is sorted, compact, and spells numbers by value."""
    assert canonical_json(b'{ "b" : [1.0, 2], "a" : "\\u00e9" }') == '{"a":"é","b":[1,2]}'.encode()
    assert canonical_json(b"not json") is None


# Any semantic change: another fingerprint -------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"amount":1001,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="value",
        ),
        pytest.param(
            b'{"amount":"1000","currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="number-vs-string",
        ),
        pytest.param(
            b'{"amount":1000.5,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="fraction",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_2","tags":["a","b"]}}',
            id="nested-value",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_1","tags":["b","a"]}}',
            id="array-order",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_1","tags":[["a","b"]]}}',
            id="array-nesting",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_1"},"tags":["a","b"]}',
            id="object-nesting",
        ),
        pytest.param(
            b'{"amount":1000,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]},'
            b'"extra":null}',
            id="added-field",
        ),
        pytest.param(b'{"amount":1000,"currency":"EUR"}', id="removed-field"),
        pytest.param(
            b'{"amount":true,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="bool-vs-number",
        ),
        pytest.param(
            b'{"amount":null,"currency":"EUR","customer":{"id":"cus_1","tags":["a","b"]}}',
            id="null",
        ),
        pytest.param(b"", id="empty-body"),
    ],
)
def test_a_changed_json_body_gives_another_fingerprint(body: bytes) -> None:
    """Values, types, nesting, array order and fields all count."""
    assert fp(body) != fp(BASE)


def test_method_path_and_query_values_count() -> None:
    """Another method, path or query value is another request."""
    base = fp()
    assert fp(method="PATCH") != base
    assert fp(path="/payments/2") != base
    assert fp(path="/Payments") != base
    assert fp(query="dry_run=1") != base
    assert fp(query="dry_run=1") != fp(query="dry_run=0")
    assert fp(query="a=1&a=2") != fp(query="a=1")


def test_method_case_does_not_count() -> None:
    """post and POST are one method."""
    assert fp(method="post") == fp(method="POST")


def test_other_bodies_are_compared_byte_for_byte() -> None:
    """Without a JSON or form media type, one different byte is another request."""
    assert fp(b"abc", content_type="text/plain") == fp(b"abc", content_type="text/plain")
    assert fp(b"abc", content_type="text/plain") != fp(b"abd", content_type="text/plain")
    assert fp(b"abc ", content_type="text/plain") != fp(b"abc", content_type="text/plain")
    octets = bytes(range(256))
    assert fp(octets, content_type=None) != fp(octets[:-1], content_type=None)


def test_a_body_that_claims_json_but_does_not_parse_is_taken_as_bytes() -> None:
    """Invalid JSON neither crashes nor merges with other invalid bodies."""
    assert fp(b"{not json") == fp(b"{not json")
    assert fp(b"{not json") != fp(b"{not json ")
    assert fp(b"\xff\xfe") != fp(b"\xff\xff")
    assert fp(b"[NaN]") != fp(b"[Infinity]")


def test_invalid_json_is_fingerprinted_like_the_same_bytes_of_another_type() -> None:
    """The fallback for bad JSON is exactly the raw-bytes fingerprint."""
    assert fp(b"{oops", content_type=JSON) == fp(b"{oops", content_type="text/plain")


def test_deeply_nested_json_does_not_crash_the_fingerprint() -> None:
    """A small body nested too deep to canonicalize falls back to bytes instead of raising."""
    deep = b"[" * 5000 + b"]" * 5000
    assert fp(deep) == fp(deep, content_type="text/plain")
    medium = b"[" * 600 + b"]" * 600
    assert fp(medium) == fp(medium)
    assert fp(medium) != fp(deep)


# Query normalization ----------------------------------------------------------------------


def test_query_parameter_order_does_not_count() -> None:
    """a=1&b=2 and b=2&a=1 are one query."""
    assert fp(query="a=1&b=2") == fp(query="b=2&a=1")


def test_query_encoding_variants_are_one_query() -> None:
    """Percent-encoding and + for space are decoded before comparing."""
    assert fp(query="q=a%20b") == fp(query="q=a+b")
    assert fp(query="q=%61") == fp(query="q=a")


def test_normalize_query_sorts_decoded_pairs_and_keeps_blank_values() -> None:
    """The normal form is sorted pairs, blank values kept."""
    assert normalize_query("b=2&a=&a=1") == "a=&a=1&b=2"
    assert normalize_query("") == ""
    assert fp(query="a=") != fp(query="")


# Form bodies ------------------------------------------------------------------------------


def test_form_bodies_compare_as_sorted_decoded_pairs() -> None:
    """Pair order and encoding variants in a form body do not count."""
    a = fp(b"amount=1000&currency=EUR&note=a+b", content_type=FORM)
    b = fp(b"currency=EUR&note=a%20b&amount=1000", content_type=FORM)
    assert a == b


def test_a_changed_form_value_gives_another_fingerprint() -> None:
    """A form value or an added pair is another request."""
    base = fp(b"amount=1000&currency=EUR", content_type=FORM)
    assert fp(b"amount=1001&currency=EUR", content_type=FORM) != base
    assert fp(b"amount=1000&currency=EUR&x=", content_type=FORM) != base
    assert fp(b"amount=1000&amount=1000&currency=EUR", content_type=FORM) != base


def test_the_same_bytes_as_form_and_as_plain_bytes_differ() -> None:
    """The body's kind (form, JSON, bytes) is part of the fingerprint."""
    body = b"a=1"
    assert fp(body, content_type=FORM) != fp(body, content_type="text/plain")


# Ignored fields ---------------------------------------------------------------------------


def test_an_ignored_top_level_field_does_not_count() -> None:
    """A field listed in ignore_fields may differ, be added or be missing."""
    ignore = ("request_id",)
    a = fp(b'{"amount":1,"request_id":"r1"}', ignore=ignore)
    assert a == fp(b'{"amount":1,"request_id":"r2"}', ignore=ignore)
    assert a == fp(b'{"amount":1}', ignore=ignore)
    assert a != fp(b'{"amount":2,"request_id":"r1"}', ignore=ignore)


def test_an_ignored_dotted_field_is_dropped_from_the_nested_object_only() -> None:
    """meta.sent_at ignores that nested field and nothing else of that name."""
    ignore = ("meta.sent_at",)
    a = fp(b'{"meta":{"sent_at":1,"who":"x"},"sent_at":1}', ignore=ignore)
    assert a == fp(b'{"meta":{"sent_at":2,"who":"x"},"sent_at":1}', ignore=ignore)
    assert a != fp(b'{"meta":{"sent_at":1,"who":"y"},"sent_at":1}', ignore=ignore)
    assert a != fp(b'{"meta":{"sent_at":1,"who":"x"},"sent_at":2}', ignore=ignore)


def test_ignoring_fields_does_not_fail_on_other_shapes() -> None:
    """A dotted path through a non-object, or a top-level array, is left as it is."""
    ignore = ("meta.sent_at", "a.b.c")
    assert fp(b'{"meta":5,"a":[1]}', ignore=ignore) == fp(b'{"a":[1],"meta":5}', ignore=ignore)
    assert fp(b"[1,2]", ignore=ignore) != fp(b"[2,1]", ignore=ignore)


def test_ignored_fields_apply_to_form_bodies() -> None:
    """A form pair named in ignore_fields does not count."""
    ignore = ("nonce",)
    a = fp(b"amount=1&nonce=x", content_type=FORM, ignore=ignore)
    assert a == fp(b"nonce=y&amount=1", content_type=FORM, ignore=ignore)
    assert a != fp(b"amount=2&nonce=x", content_type=FORM, ignore=ignore)


# The version ------------------------------------------------------------------------------


def test_the_fingerprint_carries_its_version() -> None:
    """The fingerprint is 'v1:' followed by a SHA-256 hex digest."""
    value = fp()
    version, _, digest = value.partition(":")
    assert version == FINGERPRINT_VERSION == "v1"
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")


def test_the_version_is_hashed_into_the_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other canonical rules (another version) never give the same digest."""
    import oncely._fingerprint as module

    before = fp()
    monkeypatch.setattr(module, "FINGERPRINT_VERSION", "v2")
    after = fp()
    assert after.startswith("v2:")
    assert after.split(":", 1)[1] != before.split(":", 1)[1]


def test_numbers_beyond_a_double_are_told_apart_by_their_bytes() -> None:
    """1e400 and 2e400 would both be infinity as doubles: they must not share a fingerprint."""
    a = fingerprint("POST", "/p", "", "application/json", b'{"n":1e400}')
    b = fingerprint("POST", "/p", "", "application/json", b'{"n":2e400}')
    assert a != b


def test_a_query_with_a_lone_surrogate_is_fingerprinted_not_raised() -> None:
    """A str built in Python code may hold a lone surrogate (found by fuzzing): the query is
    encoded with surrogatepass, as every other part is, and still tells requests apart."""
    odd = fingerprint("POST", "/p", "a=\ud800", None, b"")
    assert odd.startswith(FINGERPRINT_VERSION)
    assert odd != fingerprint("POST", "/p", "a=x", None, b"")
    assert normalize_query("b=2&a=1") == "a=1&b=2"  # ordinary queries unchanged
