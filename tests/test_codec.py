"""The shared record format: versioned, bodies byte for byte, corrupt data refused."""

from __future__ import annotations

import pytest

from oncely import Record, State, StoredResponse
from oncely._codec import decode_record, decode_response, encode_record, encode_response

BODY = bytes(range(256)) + b"\0\0after nul"


def test_a_response_round_trips_byte_for_byte() -> None:
    response = StoredResponse(201, (("content-type", "application/json"),), BODY)
    data = encode_response(response)
    assert data.endswith(b"\0" + BODY)
    assert decode_response(data) == response


def test_a_record_round_trips_with_phases_and_response() -> None:
    record = Record(
        key="k",
        fingerprint="v1:ab",
        state=State.COMPLETED,
        token="t",
        attempt=2,
        lease_until=1.5,
        expires_at=2.5,
        forget_at=3.5,
        response=StoredResponse(200, (), BODY, replayable=False),
        phases=(("created", '{"id":1}'),),
    )
    assert decode_record("k", encode_record(record)) == record


@pytest.mark.parametrize(
    "data",
    [
        b"no separator",
        b'{"v":99}\0',
        b"[1]\0",
        b'{"v":1,"fp":"x","state":"in_flight","token":"t","attempt":1,"lease_until":1,'
        b'"expires_at":1,"forget_at":1,"phases":"nope"}\0',
    ],
)
def test_corrupt_or_foreign_data_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"oncely record"):
        decode_record("k", data)
