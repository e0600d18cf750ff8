"""atheris: the key parser and storage_key on any bytes. Only MalformedKey may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from oncely import MalformedKey
    from oncely._keys import parse_key, storage_key


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw: bytes | str = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
    if fdp.ConsumeBool():
        raw = raw.decode("latin-1")
    try:
        key = parse_key(raw)
    except MalformedKey:
        return
    storage_key(fdp.ConsumeUnicodeNoSurrogates(40), str(key))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
