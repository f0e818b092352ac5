"""Bearer API-key authentication, as an ASGI middleware in front of every route.

Owns which paths are public and how keys are compared. Keys are compared as sha256 digests with
`hmac.compare_digest` (vLLM's scheme): the time taken does not depend on how much of a key matched,
nor on its length. Knows nothing of the routes behind it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import unauthorized

# Probes and scrapers run without credentials (vLLM keeps the same set open).
PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def tenant_of(key: str) -> str:
    """A key's public name: what scopes its sessions and its prefix-cache namespace (never the key)."""
    return hashlib.sha256(b"megalodon-tenant:" + key.encode("utf-8")).hexdigest()[:16]


class APIKeyMiddleware:
    """Answer 401 (OpenAI error shape) unless the request carries `Authorization: Bearer <key>`
    for one of `api_keys` (or `admin_key`). Public paths and non-HTTP scopes pass through.

    An accepted request's scope state gets `tenant` (the key's `tenant_of`) and `is_admin`.
    """

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], admin_key: str | None = None) -> None:
        self.app = app
        keys = list(api_keys) + ([admin_key] if admin_key else [])
        self._digests = [(_digest(key), tenant_of(key), key == admin_key) for key in keys]
        if not self._digests:
            raise ValueError("APIKeyMiddleware needs at least one key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        identity = self._identify(scope)
        if identity is None:
            await unauthorized().to_response()(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"], state["is_admin"] = identity
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> tuple[str, bool] | None:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = _digest(token.strip())
        # Compare against every key (no early exit), so timing does not reveal which one matched.
        found = None
        for digest, tenant, is_admin in self._digests:
            if hmac.compare_digest(given, digest) and found is None:
                found = (tenant, is_admin)
        return found
