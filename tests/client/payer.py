"""A client process for the crash tests: pays once, as a named operation with a journal.

    python -m tests.client.payer URL JOURNAL OPERATION CUSTOMER

Prints ``sending`` once its journal entry is written, then the answer's status and report as
one JSON line.
"""

from __future__ import annotations

import json
import sys

import httpx

from oncely.client import IdempotentTransport, KeyJournal, RetryPolicy, operation

from .support import AUTH, payment


def main(url: str, journal_path: str, name: str, customer: str) -> int:
    journal = KeyJournal(journal_path)
    # Retries of a 409 wait for the server's Retry-After (1 s) in real time, here.
    transport = IdempotentTransport(journal=journal, policy=RetryPolicy(attempts=30, deadline=60))
    with httpx.Client(base_url=url, transport=transport, headers=AUTH, timeout=60) as client:
        print("sending", flush=True)
        response = client.post("/payments", json=payment(customer), extensions=operation(name))
    print(json.dumps({"status": response.status_code, "report": response.extensions["oncely"]}))
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
