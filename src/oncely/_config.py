"""What a user configures: tenant scopes, routes, and how a request is matched to them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_METHODS",
    "Request",
    "Route",
    "Scope",
    "scope_from_header",
    "scope_from_principal",
    "single_tenant",
]

DEFAULT_METHODS = frozenset({"POST", "PATCH"})


@dataclass(frozen=True, slots=True)
class Request:
    """What a scope function sees of a request.

    ``headers`` has lower-case names; repeated headers are joined with ", ". ``raw`` is the
    framework's own view (the ASGI scope, or the WSGI environ).
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    raw: Mapping[str, Any]


Scope = Callable[[Request], "str | None"]
"""Tells tenants apart: the scope of a request, or None when it has none (then 400)."""


def scope_from_header(name: str) -> Scope:
    """The tenant is the value of header ``name`` (an API key, an account id).

    The value is hashed into the storage key and never stored, so a secret header is safe.
    """
    lowered = name.lower()

    def scope(request: Request) -> str | None:
        value = request.headers.get(lowered, "").strip()
        return value or None

    scope.__name__ = f"scope_from_header({name!r})"
    return scope


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


def scope_from_principal(resolve: Callable[[Request], object] | None = None) -> Scope:
    """The tenant is the authenticated principal the app already resolved.

    By default that is ``scope["user"]`` as set by Starlette's ``AuthenticationMiddleware`` (its
    ``identity``, ``username``, ``id`` or ``email``), or ``REMOTE_USER`` under WSGI; pass
    ``resolve`` to read it elsewhere. Place oncely inside the authentication middleware.
    An unauthenticated request has no scope and is refused with 400.
    """

    def scope(request: Request) -> str | None:
        if resolve is not None:
            user = resolve(request)
        else:
            user = request.raw.get("user", request.raw.get("REMOTE_USER"))
        return _principal_name(user)

    return scope


class _SingleTenant:
    """Every request belongs to one tenant: for an API with a single client, or behind one.

    Pass it as it is (``scope=single_tenant``) or called (``scope=single_tenant()``).
    """

    SCOPE = "single-tenant"

    @overload
    def __call__(self) -> _SingleTenant: ...
    @overload
    def __call__(self, request: Request) -> str: ...

    def __call__(self, request: Request | None = None) -> str | _SingleTenant:
        return self if request is None else self.SCOPE

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
