"""oncely: every unsafe request takes effect once.

from oncely import tenant_from_header
from oncely.asgi import IdempotencyMiddleware

app = IdempotencyMiddleware(
    app, store="sqlite:oncely.db", tenant=tenant_from_header("X-Tenant-Id")
)
"""

import logging

from ._attempt import Attempt, LeaseLost, TransactionalStore, current_attempt
from ._codec import Claimed, Existing, Record, State, StoredResponse
from ._config import (
    Request,
    Route,
    Tenant,
    single_tenant,
    tenant_from_header,
    tenant_from_principal,
)
from ._errors import (
    ConfigurationError,
    IncompleteBody,
    KeyInFlight,
    KeyReused,
    MalformedKey,
    MissingKey,
    MissingTenant,
    OncelyError,
    ProblemError,
    RequestTooLarge,
    ResponseNotReplayable,
    StoreUnavailable,
)
from ._fingerprint import fingerprint
from ._keys import parse_key, storage_key
from .decorator import Codec, ResultNotEncodable, idempotent
from .stores import AsyncStore, Store, open_async_store, open_store

__version__ = "0.1.0"

# A library logs, the application decides where to (and ``oncely.decisions`` stays silent and
# free until someone enables it for INFO).
logging.getLogger("oncely").addHandler(logging.NullHandler())

__all__ = [
    "AsyncStore",
    "Attempt",
    "Claimed",
    "Codec",
    "ConfigurationError",
    "Existing",
    "IncompleteBody",
    "KeyInFlight",
    "KeyReused",
    "LeaseLost",
    "MalformedKey",
    "MissingKey",
    "MissingTenant",
    "OncelyError",
    "ProblemError",
    "Record",
    "Request",
    "RequestTooLarge",
    "ResponseNotReplayable",
    "ResultNotEncodable",
    "Route",
    "State",
    "Store",
    "StoreUnavailable",
    "StoredResponse",
    "Tenant",
    "TransactionalStore",
    "current_attempt",
    "fingerprint",
    "idempotent",
    "open_async_store",
    "open_store",
    "parse_key",
    "single_tenant",
    "storage_key",
    "tenant_from_header",
    "tenant_from_principal",
]
