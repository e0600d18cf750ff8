"""Keys: one per operation, new or derived or the caller's own, checked before sending."""

from __future__ import annotations

import uuid

import httpx
import pytest

from oncely import ConfigurationError
from oncely.client import IdempotentTransport, KeyReusedError, operation
from oncely.client._keys import derive_key

from .conftest import MakeClient
from .support import LOSE, Service, new_customer, payment

pytestmark = pytest.mark.slow


async def test_every_post_and_patch_gets_a_new_uuid4(
    service: Service, make_client: MakeClient
) -> None:
    """Two POSTs, two fresh RFC 9562 version 4 keys, sent as bare tokens."""
    client = make_client(service.url)
    for _ in range(2):
        response = await client.request("POST", "/payments", json=payment(new_customer()))
        assert response.status_code == 201
    keys = client.faults.keys()
    assert keys[0] != keys[1]
    for key in keys:
        assert key is not None
        assert uuid.UUID(key).version == 4
        assert str(uuid.UUID(key)) == key


async def test_the_sf_string_format_sends_the_drafts_quoted_key(
    service: Service, make_client: MakeClient
) -> None:
    """key_format="sf-string": the header is a quoted string; the report has the bare key."""
    client = make_client(service.url, [LOSE], key_format="sf-string")
    response = await client.request("POST", "/payments", json=payment(new_customer()))
    assert response.status_code == 201
    assert response.extensions["oncely"]["replayed"] is True
    sent = client.faults.keys()
    assert sent[0] == sent[1] == f'"{response.extensions["oncely"]["key"]}"'


async def test_the_method_set_is_configurable(service: Service, make_client: MakeClient) -> None:
    """methods=("POST",): a PATCH goes without a key; {"key": True} adds one to any method."""
    client = make_client(service.url, methods=("POST",))
    await client.request("PATCH", "/orders/ord_missing", json={"note": "x"})
    await client.request("GET", "/payments", extensions={"oncely": {"key": True}})
    none, added = client.faults.keys()
    assert none is None
    assert added is not None


async def test_a_key_the_caller_set_wins(service: Service, make_client: MakeClient) -> None:
    """The caller's header is sent as it is, kept for the retry, and reported unquoted."""
    key = f"order-{uuid.uuid4()}"
    client = make_client(service.url, [LOSE])
    response = await client.request(
        "POST",
        "/payments",
        json=payment(new_customer()),
        headers={"Idempotency-Key": f'"{key}"'},
    )
    assert response.status_code == 201
    assert response.extensions["oncely"]["key"] == key
    assert response.extensions["oncely"]["replayed"] is True
    assert client.faults.keys() == [f'"{key}"', f'"{key}"']


@pytest.mark.parametrize(
    "bad", ["two words", "", "x" * 256, "caf\u00e9", '"unterminated'], ids=repr
)
async def test_a_malformed_caller_key_fails_before_anything_is_sent(
    bad: str, service: Service, make_client: MakeClient
) -> None:
    """1-255 visible ASCII, else ConfigurationError naming the header, and nothing sent."""
    client = make_client(service.url)
    with pytest.raises(ConfigurationError, match="Idempotency-Key"):
        await client.request(
            "POST",
            "/payments",
            json=payment(new_customer()),
            headers={"Idempotency-Key": bad.encode("utf-8")},
        )
    assert client.faults.attempts == 0


async def test_the_same_caller_key_with_another_body_fails_locally(
    service: Service, make_client: MakeClient
) -> None:
    """KeyReusedError before the second request reaches the server."""
    key = str(uuid.uuid4())
    customer = new_customer()
    client = make_client(service.url)
    first = await client.request(
        "POST", "/payments", json=payment(customer, 100), headers={"Idempotency-Key": key}
    )
    assert first.status_code == 201
    with pytest.raises(KeyReusedError) as caught:
        await client.request(
            "POST", "/payments", json=payment(customer, 200), headers={"Idempotency-Key": key}
        )
    assert caught.value.key == key
    assert caught.value.problem is None
    assert client.faults.attempts == 1
    # The same body again (its keys in another order) is the same request: a replay.
    again = await client.request(
        "POST",
        "/payments",
        json={"customer": customer, "currency": "USD", "amount": 100},
        headers={"Idempotency-Key": key},
    )
    assert again.extensions["oncely"]["replayed"] is True


async def test_the_servers_key_reused_problem_raises_key_reused_error(
    service: Service, make_client: MakeClient
) -> None:
    """A process that never saw the key: the server's 422 idempotency-key-reused is raised as
    KeyReusedError carrying the problem, and not retried."""
    key = str(uuid.uuid4())
    customer = new_customer()
    first = make_client(service.url)
    await first.request(
        "POST", "/payments", json=payment(customer, 100), headers={"Idempotency-Key": key}
    )
    second = make_client(service.url)
    with pytest.raises(KeyReusedError) as caught:
        await second.request(
            "POST", "/payments", json=payment(customer, 200), headers={"Idempotency-Key": key}
        )
    assert caught.value.key == key
    assert caught.value.attempts == 1
    assert caught.value.problem is not None
    assert caught.value.problem["type"] == "https://oncely.dev/problems/idempotency-key-reused"
    assert caught.value.problem["status"] == 422
    assert second.faults.attempts == 1
    assert len(service.payments(customer)) == 1


async def test_an_operation_keeps_its_key_in_the_process_without_a_journal(
    service: Service, make_client: MakeClient
) -> None:
    """The same operation twice in one process: one key, the second answer a replay."""
    customer = new_customer()
    client = make_client(service.url)
    answers = [
        await client.request(
            "POST", "/payments", json=payment(customer), extensions=operation(customer)
        )
        for _ in range(2)
    ]
    assert [a.extensions["oncely"]["replayed"] for a in answers] == [False, True]
    assert len(set(client.faults.keys())) == 1
    assert len(service.payments(customer)) == 1


async def test_derived_keys_are_stable_across_transports_and_unguessable(
    service: Service, make_client: MakeClient
) -> None:
    """derive_keys=SECRET: HMAC-SHA256(secret, operation) as a UUID; another process with the
    same secret sends the same key, another secret another one."""
    secret = "s3cret-0123456789abcdef"
    customer = new_customer()
    keys = []
    for _ in range(2):
        client = make_client(service.url, derive_keys=secret)
        response = await client.request(
            "POST", "/payments", json=payment(customer), extensions=operation(customer)
        )
        keys.append(response.extensions["oncely"]["key"])
    assert keys[0] == keys[1] == derive_key(secret.encode(), customer)
    assert uuid.UUID(keys[0]).version == 8
    assert uuid.UUID(keys[0]).variant == uuid.RFC_4122
    assert derive_key(b"another-secret-0123456789", customer) != keys[0]
    assert len(service.payments(customer)) == 1


def test_a_short_derive_keys_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="derive_keys"):
        IdempotentTransport(derive_keys="short")


def test_no_key_and_an_own_key_at_once_is_refused() -> None:
    """key=False with a caller's header, or with an operation, is a contradiction."""
    with httpx.Client(transport=IdempotentTransport(httpx.MockTransport(_never))) as client:
        with pytest.raises(ConfigurationError, match="key=False"):
            client.post(
                "http://x/", headers={"Idempotency-Key": "k"}, extensions={"oncely": {"key": False}}
            )
        with pytest.raises(ConfigurationError, match="key=False"):
            client.post("http://x/", extensions={"oncely": {"key": False, "operation": "o"}})


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("nothing may be sent")
