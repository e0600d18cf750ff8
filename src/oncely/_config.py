"""What a user configures: tenants, routes, options, and how a request is matched to them.

:class:`Options` checks every option once and resolves a request (method, path) to the
:class:`~oncely._flow.Policy` of its route, with a cache; every surface (ASGI, WSGI) shares it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, overload

from ._errors import ConfigurationError
from ._flow import DEFAULT_HEADER_ALLOWLIST, Policy
from ._observe import hooks_of
from .events import DecisionHook

__all__ = [
    "DEFAULT_METHODS",
    "Options",
    "Request",
    "Resolved",
    "Route",
    "Settings",
    "Tenant",
    "single_tenant",
    "tenant_from_header",
    "tenant_from_principal",
]

DEFAULT_METHODS = frozenset({"POST", "PATCH"})


@dataclass(frozen=True, slots=True)
class Request:
    """What a tenant function sees of a request.

    ``headers`` has lower-case names; repeated headers are joined with ", ". ``raw`` is the
    framework's own view (the ASGI scope, or the WSGI environ).
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    raw: Mapping[str, Any]


Tenant = Callable[[Request], "str | None"]
"""Tells tenants apart: the tenant of a request, or None when it has none (then 400)."""


def tenant_from_header(name: str) -> Tenant:
    """The tenant is the value of header ``name`` (an API key, an account id).

    The value is hashed into the storage key and never stored, so a secret header is safe.
    """
    lowered = name.lower()

    def tenant(request: Request) -> str | None:
        value = request.headers.get(lowered, "").strip()
        return value or None

    tenant.__name__ = f"tenant_from_header({name!r})"
    return tenant


def _principal_name(user: object) -> str | None:
    if user is None or getattr(user, "is_authenticated", True) is False:
        return None
    for attribute in ("identity", "username", "id", "email"):
        value = getattr(user, attribute, None)
        if value not in (None, ""):
            return str(value)
    if isinstance(user, str) and user:
        return user
    return None


def tenant_from_principal(resolve: Callable[[Request], object] | None = None) -> Tenant:
    """The tenant is the authenticated principal the app already resolved.

    By default that is ``scope["user"]`` as set by Starlette's ``AuthenticationMiddleware`` (its
    ``identity``, ``username``, ``id`` or ``email``), or ``REMOTE_USER`` under WSGI; pass
    ``resolve`` to read it elsewhere. Place oncely inside the authentication middleware.
    An unauthenticated request has no tenant and is refused with 400.
    """

    def tenant(request: Request) -> str | None:
        if resolve is not None:
            user = resolve(request)
        else:
            user = request.raw.get("user", request.raw.get("REMOTE_USER"))
        return _principal_name(user)

    return tenant


class _SingleTenant:
    """Every request belongs to one tenant: for an API with a single client, or behind one.

    Pass it as it is (``tenant=single_tenant``) or called (``tenant=single_tenant()``).
    """

    TENANT = "single-tenant"

    @overload
    def __call__(self) -> _SingleTenant: ...
    @overload
    def __call__(self, request: Request) -> str: ...

    def __call__(self, request: Request | None = None) -> str | _SingleTenant:
        return self if request is None else self.TENANT

    def __repr__(self) -> str:
        return "single_tenant"


single_tenant = _SingleTenant()


def _compile(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ConfigurationError(f"route pattern {pattern!r} must start with '/'")
    parts = re.split(r"(\{[^}/]*\}|\*\*|\*)", pattern)
    regex = []
    last = len(parts) - 2  # re.split leaves an empty string after a trailing separator
    for index, part in enumerate(parts):
        if part == "**" or (part == "*" and index == last and parts[-1] == ""):
            regex.append(".*")
        elif part == "*" or part.startswith("{"):
            regex.append("[^/]+")
        else:
            regex.append(re.escape(part))
    return re.compile("".join(regex) + r"\Z")


@dataclass(frozen=True)
class Route:
    """Idempotency settings for the requests whose path matches ``path``.

    ``path``: ``/payments``, ``/orders/{id}`` (``{name}`` or ``*`` is one segment), ``/api/**``
    (``**``, or a trailing ``*``, is anything). ``methods``: which methods it protects (default: the
    middleware's). ``required``: a missing key is 400; if False, such a request runs unprotected.
    ``enabled=False`` leaves matching requests alone. Other fields override the middleware's.
    """

    path: str
    methods: Iterable[str] | None = None
    required: bool = True
    enabled: bool = True
    ttl: float | None = None
    tombstone_ttl: float | None = None
    lease: float | None = None
    wait: float | None = None
    replay_errors: bool | None = None
    ignore_fields: tuple[str, ...] = ()
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _methods: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", _compile(self.path))
        methods = None if self.methods is None else frozenset(m.upper() for m in self.methods)
        object.__setattr__(self, "_methods", methods)

    def matches(self, method: str, path: str, default_methods: frozenset[str]) -> bool:
        methods = self._methods if self._methods is not None else default_methods
        return method in methods and self._regex.match(path) is not None


MiB = 1024 * 1024


class Settings(TypedDict, total=False):
    """The options every middleware takes besides ``tenant`` and ``store`` (see the README)."""

    methods: Iterable[str]
    routes: Iterable[Route]
    header: str
    required: bool
    ttl: float
    tombstone_ttl: float
    lease: float
    wait: float
    replay_errors: bool
    fail_open: bool
    ignore_fields: Iterable[str]
    max_request_body: int
    max_response_body: int
    store_timeout: float
    retry_after: float
    header_allowlist: Iterable[str]
    namespace: str
    on_decision: DecisionHook | Iterable[DecisionHook] | None


@dataclass(frozen=True, slots=True)
class Resolved:
    """What applies to one (method, path): its policy, whether a key is required, and the
    body fields left out of its fingerprint."""

    policy: Policy
    required: bool
    ignore_fields: tuple[str, ...]
    #: The pattern of the Route that matched (None: the middleware's defaults applied).
    route: str | None = None


class Options:
    """Every option, checked once, and the resolution of a request to its route's settings."""

    def __init__(
        self,
        *,
        tenant: Tenant,
        methods: Iterable[str] = DEFAULT_METHODS,
        routes: Iterable[Route] = (),
        header: str = "Idempotency-Key",
        required: bool = True,
        ttl: float = 24 * 3600.0,
        tombstone_ttl: float = 7 * 24 * 3600.0,
        lease: float = 60.0,
        wait: float = 0.0,
        replay_errors: bool = False,
        fail_open: bool = False,
        ignore_fields: Iterable[str] = (),
        max_request_body: int = 10 * MiB,
        max_response_body: int = 1 * MiB,
        store_timeout: float = 5.0,
        retry_after: float = 1.0,
        header_allowlist: Iterable[str] = DEFAULT_HEADER_ALLOWLIST,
        namespace: str = "",
        on_decision: DecisionHook | Iterable[DecisionHook] | None = None,
    ) -> None:
        if not callable(tenant):
            raise ConfigurationError(
                "tenant must be a callable over the request: tenant_from_header(name), "
                "tenant_from_principal() or single_tenant"
            )
        if lease <= 0 or ttl <= 0 or tombstone_ttl < 0 or wait < 0 or store_timeout <= 0:
            raise ConfigurationError("lease, ttl and store_timeout must be positive")
        self.tenant = tenant
        self.methods = frozenset(m.upper() for m in methods)
        self.routes = tuple(routes)
        self.header = header
        self.header_lower = header.lower()
        self.max_request_body = max_request_body
        self.max_response_body = max_response_body
        self.store_timeout = store_timeout
        self.namespace = namespace
        self.on_decision = hooks_of(on_decision)
        self.header_allowlist = frozenset(h.lower() for h in header_allowlist)
        self.policy = Policy(
            lease=lease,
            ttl=ttl,
            tombstone_ttl=tombstone_ttl,
            wait=wait,
            retry_after=retry_after,
            replay_errors=replay_errors,
            fail_open=fail_open,
            store_timeout=store_timeout,
        )
        self.ignore_fields = tuple(ignore_fields)
        self._default = Resolved(self.policy, required, self.ignore_fields)
        self._cache: dict[tuple[str, str], Resolved | None] = {}

    def resolve(self, method: str, path: str) -> Resolved | None:
        """The settings for (method, path), or None when such requests are not protected."""
        cache_key = (method, path)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        resolved: Resolved | None = None
        for route in self.routes:
            if route.matches(method, path, self.methods):
                if route.enabled:
                    resolved = self._for(route)
                break
        else:
            if method in self.methods:
                resolved = self._default
        if len(self._cache) < 10_000:  # paths with ids are unbounded; keep the cache small
            self._cache[cache_key] = resolved
        return resolved

    def _for(self, route: Route) -> Resolved:
        overrides = {
            name: getattr(route, name)
            for name in ("lease", "ttl", "tombstone_ttl", "wait", "replay_errors")
            if getattr(route, name) is not None
        }
        policy = dataclasses.replace(self.policy, **overrides)
        return Resolved(
            policy, route.required, self.ignore_fields + route.ignore_fields, route.path
        )
