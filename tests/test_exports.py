"""The public surface, pinned: a name added or removed here is a deliberate API change."""

from __future__ import annotations

import importlib.metadata
import inspect

import oncely
import oncely.asgi

ONCELY_ALL = [
    "AsyncStore",
    "Attempt",
    "Claimed",
    "Codec",
    "ConfigurationError",
    "Existing",
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


def test_oncely_exports_exactly_the_pinned_names() -> None:
    """oncely.__all__ is the documented surface, in order."""
    assert oncely.__all__ == ONCELY_ALL


def test_oncely_asgi_exports_only_the_middleware() -> None:
    """oncely.asgi has one public name."""
    assert oncely.asgi.__all__ == ["IdempotencyMiddleware"]


def test_every_exported_name_exists() -> None:
    """Each name in __all__ resolves (from oncely import * cannot fail)."""
    for module in (oncely, oncely.asgi):
        for name in module.__all__:
            assert getattr(module, name, None) is not None, f"{module.__name__}.{name}"


def test_no_public_name_is_exported_by_accident() -> None:
    """Every public, non-module attribute of oncely is in __all__ (besides __version__)."""
    public = {
        name
        for name, value in vars(oncely).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(ONCELY_ALL)


def test_the_version_matches_the_package_metadata() -> None:
    """oncely.__version__ is the version the package was installed as."""
    assert oncely.__version__ == importlib.metadata.version("oncely")
