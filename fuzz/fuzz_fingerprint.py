"""atheris: fingerprint() is total and deterministic on any method, path, query, type, body."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from oncely._fingerprint import fingerprint


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.ConsumeUnicodeNoSurrogates(8)
    path = fdp.ConsumeUnicodeNoSurrogates(40)
    query = fdp.ConsumeUnicodeNoSurrogates(40)
    types = [None, "application/json", "application/x-www-form-urlencoded", "text/plain"]
    pick = fdp.ConsumeIntInRange(0, len(types))
    content_type = types[pick] if pick < len(types) else fdp.ConsumeUnicodeNoSurrogates(60)
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
    ignore = [fdp.ConsumeUnicodeNoSurrogates(8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    first = fingerprint(method, path, query, content_type, body, ignore)
    assert first == fingerprint(method, path, query, content_type, body, ignore)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
