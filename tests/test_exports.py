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


CLIENT_ALL = [
    "SHARED_BUDGET",
    "AsyncIdempotentTransport",
    "AttemptReport",
    "BodyNotReplayable",
    "IdempotentTransport",
    "JournalEntry",
    "KeyExpiredError",
    "KeyJournal",
    "KeyReusedError",
    "Report",
    "RetryBudget",
    "RetryEvent",
    "RetryLater",
    "RetryPolicy",
    "operation",
]


def test_oncely_client_exports_exactly_the_pinned_names() -> None:
    """oncely.client (the extra oncely[client]) has its own documented surface."""
    import oncely.client

    assert oncely.client.__all__ == CLIENT_ALL
    public = {
        name
        for name, value in vars(oncely.client).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - {"annotations"} == set(CLIENT_ALL)
    for name in CLIENT_ALL:
        assert getattr(oncely.client, name, None) is not None, name


def test_import_oncely_does_not_import_the_client() -> None:
    """The core never pulls in httpx: the client is imported only when asked for."""
    import subprocess
    import sys

    code = "import sys, oncely; sys.exit('oncely.client' in sys.modules or 'httpx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_client_without_httpx_says_which_extra_to_install() -> None:
    """With no third-party package importable, oncely.client names oncely[client]."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(oncely.__file__).resolve().parents[1]
    code = "import sys; sys.path.insert(0, sys.argv[1]); import oncely.client"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, str(src)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "pip install 'oncely[client]'" in result.stderr
